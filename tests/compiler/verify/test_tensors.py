"""compile → verify as a user runs it: exit 0 when the artifact matches, 3 when it does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import detc
from detc.compiler import VerificationMismatchError
from detc.compiler.verify.tensors import verify_tensors


def _small_net(rng: np.random.Generator) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
        helper.make_node("Mul", ["c1", "s1"], ["a1"], name="silu1"),
        helper.make_node("Conv", ["a1", "w2"], ["output0"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4, 16, 16])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def detc_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    model_path = root / "small.onnx"
    onnx.save(_small_net(np.random.default_rng(0)), model_path)
    result = detc.compile_model(model_path, target="x86", out_dir=root / "art", progress=False)
    assert result.manifest["source"]["sha256"]
    return model_path, root / "art"


def test_python_api_load_runs_the_artifact(compiled: tuple[Path, Path]) -> None:
    model_path, artifact = compiled
    model = detc.load(artifact)
    x = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
    from detc.compiler.reference import ort_session, run_session

    expected = run_session(ort_session(onnx.load(model_path)), {"images": x})["output0"]
    np.testing.assert_allclose(model(images=x)["output0"], expected, rtol=1e-4, atol=1e-5)


def test_cli_verify_passes_and_reports_each_output(compiled: tuple[Path, Path]) -> None:
    model_path, artifact = compiled
    result = detc_cli("verify", str(artifact), "--reference", str(model_path), "--runs", "2")
    assert result.returncode == 0, result.stderr
    assert "output0" in result.stdout and "verify: ok" in result.stdout
    as_json = detc_cli("verify", str(artifact), "--json")  # reference defaults to the source
    report = json.loads(as_json.stdout)
    assert report["ok"] is True and report["outputs"][0]["max_abs_error"] < 1e-4


def test_verify_artifact_is_detc_verify_from_python(compiled: tuple[Path, Path]) -> None:
    model_path, artifact = compiled
    # the reference: the model compiled from, as the artifact keeps it (never the source path)
    report = detc.verify_artifact(artifact, runs=2)
    assert report.ok and report.exit_status == 0 and report.failures == []
    assert report.reference == artifact / "reference.onnx"
    assert report.reference.read_bytes() == model_path.read_bytes()
    assert report.detection is None and report.detection_lines() == []
    lines = report.lines()
    assert lines[0] == f"reference {report.reference}, inputs: {report.tensors.inputs}"
    assert "output0" in lines[1] and lines[-1] == "verify: ok"
    report.raise_for_failures()


def test_verify_uses_given_inputs(compiled: tuple[Path, Path], tmp_path: Path) -> None:
    model_path, artifact = compiled
    inputs = tmp_path / "x.npz"
    np.savez(inputs, images=np.full((1, 3, 16, 16), 0.5, np.float32))
    report = verify_tensors(artifact, model_path, inputs=str(inputs))
    assert report.ok and report.inputs == str(inputs)


def test_tampered_artifact_exits_3(compiled: tuple[Path, Path], tmp_path: Path) -> None:
    model_path, _ = compiled
    from detc.targets import TuningOptions

    # the plain pipeline keeps the weights in params.npz, where a tamperer can reach them (the
    # default blocked one compiles them into model.so, whose sha256 is checked before loading)
    broken = tmp_path / "broken"
    plain = {"tuning": TuningOptions(tune=False, layout="plain")}
    detc.compile_model(
        model_path, target="x86", out_dir=broken, progress=False, target_options=plain
    )
    with np.load(broken / "params.npz") as data:
        params = {k: data[k] for k in data.files}
    first = sorted(params)[0]
    params[first] = params[first] * 1.01  # a 1 % weight error: small, but far beyond tolerance
    np.savez(broken / "params.npz", **params)
    with pytest.raises(VerificationMismatchError):
        report = verify_tensors(broken, model_path)
        if not report.ok:
            raise VerificationMismatchError("mismatch")
    result = detc_cli("verify", str(broken), "--reference", str(model_path))
    assert result.returncode == 3
    assert "MISMATCH" in result.stdout and "beyond tolerance" in result.stderr
    verification = detc.verify_artifact(broken, reference=model_path)
    assert verification.exit_status == 3
    assert verification.failures == ["output(s) output0 beyond tolerance"]
    with pytest.raises(VerificationMismatchError, match=f"{broken}: output"):
        verification.raise_for_failures()


def test_verify_against_a_different_model_is_bad_input(
    compiled: tuple[Path, Path], tmp_path: Path
) -> None:
    _, artifact = compiled
    other = _small_net(np.random.default_rng(0))
    other.graph.input[0].name = "pixels"
    other.graph.node[0].input[0] = "pixels"
    path = tmp_path / "other.onnx"
    onnx.save(other, path)
    result = detc_cli("verify", str(artifact), "--reference", str(path))
    assert result.returncode == 2 and "do not match the artifact" in result.stderr


def test_compile_without_cross_compiler_exits_2_with_install_line(tmp_path: Path) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(_small_net(np.random.default_rng(0)), model_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    env.pop("DETC_AARCH64_CC", None)
    env.pop("DETC_AARCH64_CXX", None)
    result = detc_cli(
        "compile", str(model_path), "--target", "arm", "-o", str(tmp_path / "a"), env=env
    )
    assert result.returncode == 2, result.stderr
    assert "apt-get install gcc-aarch64-linux-gnu" in result.stderr
    assert not (tmp_path / "a").exists()


def _have_arm_tools() -> bool:
    from shutil import which

    return bool(which("aarch64-linux-gnu-gcc") and which("qemu-aarch64"))


@pytest.mark.skipif(not _have_arm_tools(), reason="aarch64 cross compiler or qemu-user missing")
def test_arm_artifact_verifies_under_emulation(tmp_path: Path) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(_small_net(np.random.default_rng(0)), model_path)
    out = tmp_path / "arm"
    compiled = detc_cli("compile", str(model_path), "--target", "arm:cortex-a76", "-o", str(out))
    assert compiled.returncode == 0, compiled.stderr
    assert (out / "model.so").read_bytes()[18] == 183  # ELF e_machine: EM_AARCH64
    native = detc_cli("verify", str(out))
    assert native.returncode == 2 and "--emulate" in native.stderr
    emulated = detc_cli("verify", str(out), "--emulate", "--runs", "2")
    assert emulated.returncode == 0, emulated.stderr
    assert "emulated: numerics only" in emulated.stdout


def test_verify_and_bench_on_an_rpc_board(compiled: tuple[Path, Path]) -> None:
    """The board path end to end, with a loopback x86 RPC server standing in for the board."""
    from detc.targets import local_rpc_server

    _, artifact = compiled
    with local_rpc_server() as server:
        verified = detc_cli("verify", str(artifact), "--device", server.url, "--runs", "2")
        assert verified.returncode == 0, verified.stderr
        assert "verify: ok" in verified.stdout
        timed = detc_cli("bench", str(artifact), "--device", server.url, "--runs", "5", "--json")
        assert timed.returncode == 0, timed.stderr
        data = json.loads(timed.stdout)
        assert data["a"]["median_ms"] > 0 and data["device"] == server.url
    refused = detc_cli("verify", str(artifact), "--device", server.url)
    assert refused.returncode == 2 and server.url.split("//")[1] in refused.stderr
