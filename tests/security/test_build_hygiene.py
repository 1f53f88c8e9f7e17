"""A build writes nothing outside -o and leaves nothing behind: output locations checked before
the work, what a killed build left cleaned by the next one, Ctrl-C at any moment a quiet exit 130,
byte-identical rebuilds; and models detc accepted run (0-d parameters and inputs)."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler import compile_model
from detc.compiler.cli.app import _LibraryErrors, failing_component
from detc.compiler.errors import BadInputError, UnsupportedModelError
from detc.targets import build_artifact, load_artifact
from detc.targets.tuning.options import TuningOptions
from detc.targets.x86.target import X86Target
from tests.security.hostile import child_env, conv_model, run_detc

#: weights beside the library in params.npz (the default x86 pipeline binds them as constants)
PLAIN = TuningOptions(tune=False, layout="plain")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_what_a_killed_build_left_is_removed_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}-abc123"
    retired = tmp_path / ".out.old-0123abcd"
    alive = tmp_path / f".out.tmp-{os.getpid()}-inflight"  # a build still running: kept
    other = tmp_path / f".other.tmp-{_dead_pid()}-abc123"  # another output's: not ours to judge
    for folder in (dead, retired, alive, other):
        folder.mkdir()
        (folder / "model.so").write_bytes(b"half written")
    build_artifact(conv_model(), "x86", out, manifest_fields={}, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name, other.name])


def test_a_sigkilled_compile_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    onnx.save(conv_model(), tmp_path / "conv.onnx")
    argv = [sys.executable, "-m", "detc.compiler.cli", "compile", "conv.onnx", "-o", "out"]
    env = child_env(tmp_path)
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    staged: list[Path] = []
    while not staged and process.poll() is None and time.monotonic() < deadline:
        staged = list(tmp_path.glob(".out.tmp-*"))
        time.sleep(0.005)
    process.kill()
    process.wait()
    if not staged or not staged[0].exists():
        pytest.skip("the build finished before it could be killed mid-way")
    assert staged[0].name.startswith(f".out.tmp-{process.pid}-")
    again = run_detc(["compile", "conv.onnx", "-o", "out", "--quiet"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob(".out.*")) and (tmp_path / "out" / "manifest.json").is_file()


@pytest.mark.parametrize("delay_s", [0.25, 0.7])
def test_ctrl_c_while_detc_starts_is_a_quiet_exit_130(tmp_path: Path, delay_s: float) -> None:
    onnx.save(conv_model(), tmp_path / "conv.onnx")
    process = subprocess.Popen(
        [sys.executable, "-m", "detc.compiler.cli", "compile", "conv.onnx", "-o", "out"],
        cwd=tmp_path,
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # what a terminal's foreground job has (a shell starts background jobs ignoring SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay_s)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "detc: interrupted", stderr
    assert "Traceback" not in stderr
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()


def test_a_rebuild_is_byte_identical(tmp_path: Path) -> None:
    """The same model compiled in two folders, with different hash seeds: every file of the two
    artifacts is the same, model.so included."""
    digests = []
    home = tmp_path / "home"  # one user: the same tuning database
    for index, seed in enumerate(("1", "2")):
        folder = tmp_path / f"build{index}"
        folder.mkdir()
        onnx.save(conv_model(), folder / "conv.onnx")
        run = run_detc(
            ["compile", "conv.onnx", "-o", "out", "--quiet"],
            folder,
            env={"PYTHONHASHSEED": seed, "HOME": str(home), "XDG_CACHE_HOME": str(home / "c")},
        )
        assert run.returncode == 0, run.stderr
        files = sorted((folder / "out").iterdir())
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert set(digests[0]) >= {"manifest.json", "model.so", "params.npz", "reference.onnx"}
    assert digests[0] == digests[1]


def test_source_date_epoch_dates_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    manifest = build_artifact(conv_model(), "x86", tmp_path / "a", manifest_fields={})
    assert datetime.datetime.fromisoformat(manifest["built_at"]) == datetime.datetime(
        2023, 11, 14, 22, 13, 20, tzinfo=datetime.timezone.utc
    )
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(BadInputError, match="SOURCE_DATE_EPOCH"):
        build_artifact(conv_model(), "x86", tmp_path / "b", manifest_fields={})


def test_the_output_location_is_checked_before_the_model_is_read(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        compile_model(tmp_path / "absent.onnx", out_dir=tmp_path / "file" / "out")
    with pytest.raises(BadInputError, match="too long"):
        compile_model(tmp_path / "absent.onnx", out_dir=tmp_path / ("o" * 250))


def test_an_error_of_the_target_phases_names_the_model_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_build(self: X86Target, ctx: object) -> str:
        raise UnsupportedModelError("x86 build failed: no schedule for conv2d")

    monkeypatch.setattr(X86Target, "build", failing_build)
    onnx.save(conv_model(), tmp_path / "conv.onnx")
    with pytest.raises(UnsupportedModelError, match=r"^.*conv\.onnx: x86 build failed"):
        compile_model(tmp_path / "conv.onnx", out_dir=tmp_path / "out", progress=False)


def _scalar_model(as_input: bool) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
    initializers = []
    if as_input:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    else:
        initializers.append(numpy_helper.from_array(np.array(2.5, np.float32), "s"))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"], name="scale")],
        "scalar",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("as_input", [False, True], ids=["0-d parameter", "0-d input"])
def test_zero_dimensional_tensors_run(tmp_path: Path, as_input: bool) -> None:
    model = _scalar_model(as_input)
    manifest = build_artifact(
        model, "x86", tmp_path / "a", manifest_fields={}, tuning=PLAIN, progress=False
    )
    assert manifest["params"]["count"] == (0 if as_input else 1)
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    feeds = {"x": x, "s": np.array(-1.5, np.float32)} if as_input else {"x": x}
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    actual = load_artifact(tmp_path / "a", num_threads=1).run(feeds)["y"]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_an_internal_error_names_the_library_it_came_from() -> None:
    try:
        np.linalg.inv(np.zeros((2, 2)))
    except np.linalg.LinAlgError as error:
        assert failing_component(error) == "numpy"
    try:
        {"present": 1}["absent"]
    except KeyError as error:
        assert failing_component(error) == "detc"


def test_a_library_log_record_is_one_line_without_traceback() -> None:
    try:
        raise RuntimeError("inner\nsecond line")
    except RuntimeError:
        record = logging.LogRecord(
            "onnx_ir.passes",
            logging.ERROR,
            "x.py",
            1,
            "failed:\n%s",
            ("\x1b[2Jboom",),
            sys.exc_info(),
        )
    line = _LibraryErrors().format(record)
    assert line == "detc: error (onnx-ir): failed:"
