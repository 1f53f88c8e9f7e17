"""ARM target: presets, cross compiler discovery, aarch64 ELF output, emulated runs vs ORT."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.errors import BadInputError, ToolchainMissingError
from detc.targets.arm.target import ARM_PRESETS, arm_target, build_arm_library, get_arm_preset
from detc.targets.doctor import doctor
from detc.targets.remote import emulator as _emulator
from detc.targets.remote import toolchain as _toolchain

# (dot product, i8mm, SVE, fp16 arithmetic) per preset, from Arm's core documentation.
EXPECTED_FEATURES = {
    "arm": (False, False, False, False),
    "arm:cortex-a53": (False, False, False, False),
    "arm:cortex-a55": (True, False, False, True),
    "arm:cortex-a72": (False, False, False, False),
    "arm:cortex-a76": (True, False, False, True),
    "arm:neoverse-n1": (True, False, False, True),
    "arm:neoverse-v1": (True, True, True, True),
}

RTOL, ATOL = 1e-4, 1e-5


def _fake_elf(machine: int) -> bytes:
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[18:20] = machine.to_bytes(2, "little")
    return bytes(header)


def have_cross_compiler() -> bool:
    """Whether the aarch64 cross toolchain (C and C++) is installed."""
    _toolchain.clear_toolchain_cache()
    try:
        _toolchain.find_aarch64_cross_compiler(require_cxx=True)
    except ToolchainMissingError:
        return False
    return True


needs_cross = pytest.mark.skipif(
    not have_cross_compiler(), reason="no aarch64 cross compiler (gcc-aarch64-linux-gnu)"
)
needs_qemu = pytest.mark.skipif(
    _toolchain.find_qemu_aarch64() is None, reason="no qemu-aarch64 (qemu-user)"
)


@pytest.fixture
def fresh_toolchain_cache():
    _toolchain.clear_toolchain_cache()
    yield
    _toolchain.clear_toolchain_cache()


def test_every_expected_preset_exists() -> None:
    assert set(EXPECTED_FEATURES) == set(ARM_PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED_FEATURES))
def test_preset_features_match_the_core(name: str) -> None:
    import tvm

    dotprod, i8mm, sve, fp16 = EXPECTED_FEATURES[name]
    preset = get_arm_preset(name)
    assert ("+dotprod" in preset.mattr) == dotprod
    assert ("+i8mm" in preset.mattr) == i8mm
    assert "+neon" in preset.mattr
    # TVM's schedules read these keys, so check what the target really carries.
    target = tvm.target.Target(preset.tvm_target())
    assert target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert bool(target.attrs["feature.has_dotprod"]) == dotprod
    assert bool(target.attrs["feature.has_matmul_i8"]) == i8mm
    assert bool(target.attrs["feature.has_sve"]) == sve
    assert bool(target.attrs["feature.has_fp16_simd"]) == fp16
    assert bool(target.attrs["feature.has_asimd"])
    assert "arm_cpu" in [str(key) for key in target.keys]


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED_FEATURES if n != "arm"))
def test_preset_claims_no_feature_beyond_its_core(name: str) -> None:
    import tvm
    from tvm.target import codegen

    preset = get_arm_preset(name)
    core_only = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": preset.mcpu}
    )
    core_features = set(codegen.llvm_get_cpu_features(core_only))
    claimed = {feature.lstrip("+") for feature in preset.mattr}
    assert claimed <= core_features, f"{name} claims {sorted(claimed - core_features)}"


def test_target_dict_shape_and_core_override() -> None:
    target = arm_target("arm:cortex-a55", num_cores=2)
    assert target == {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "cortex-a55",
        "mattr": ["+neon", "+fullfp16", "+dotprod"],
        "num-cores": 2,
    }
    assert "mcpu" not in arm_target("arm")
    assert all(preset.description for preset in ARM_PRESETS.values())


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(BadInputError, match=r"arm:cortex-a99.*arm:cortex-a55") as info:
        get_arm_preset("arm:cortex-a99")
    assert "\n" not in str(info.value)


def test_missing_cross_compiler_names_the_install_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_toolchain_cache: None
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(_toolchain.CROSS_CC_ENV, raising=False)
    monkeypatch.setenv(_toolchain.CROSS_SYSROOT_ENV, str(tmp_path / "no-sysroot"))
    with pytest.raises(ToolchainMissingError) as info:
        _toolchain.find_aarch64_cross_compiler()
    message = str(info.value)
    assert "sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu" in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_cross_compiler_override_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_toolchain_cache: None
) -> None:
    monkeypatch.setenv(_toolchain.CROSS_CC_ENV, str(tmp_path / "no-such-gcc"))
    with pytest.raises(ToolchainMissingError, match="DETC_AARCH64_CC"):
        _toolchain.find_aarch64_cross_compiler()


def test_missing_qemu_names_the_install_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainMissingError, match=r"apt-get install qemu-user") as info:
        _toolchain.require_qemu_aarch64()
    assert info.value.exit_code == 2


def test_doctor_reports_every_tool() -> None:
    records = doctor()
    tools = [record.tool for record in records]
    for expected in ("host C compiler", "aarch64 cross compiler", "qemu-aarch64", "nvcc"):
        assert expected in tools
    assert all(record.install_hint and record.needed_for for record in records)
    tvm_record = next(record for record in records if record.tool == "TVM build")
    assert tvm_record.found is not None and "LLVM" in tvm_record.found
    cross = next(record for record in records if record.tool == "aarch64 cross compiler")
    assert cross.ok == have_cross_compiler()


def test_elf_machine_reads_the_header(tmp_path: Path) -> None:
    fake = tmp_path / "fake.so"
    fake.write_bytes(_fake_elf(183))
    assert _toolchain.elf_machine(fake) == _toolchain.EM_AARCH64
    fake.write_bytes(b"not an elf file at all")
    assert _toolchain.elf_machine(fake) is None


# --------------------------------------------------------------------------------------------
# Compiled artifacts


def _tiny_conv_model(rng: np.random.Generator) -> onnx.ModelProto:
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("Add", ["relu", "conv"], ["out"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _build_arm_artifact(
    model: onnx.ModelProto, preset: str, out_dir: Path, *, plain: bool = False
) -> Path:
    """The artifact through the target phases, exactly as ``detc compile --target <preset>``
    (``plain``: with ``--layout plain``, weights in params.npz)."""
    from detc.targets.artifact import build_artifact
    from detc.targets.tuning.options import TuningOptions

    notices: list[str] = []
    tuning = TuningOptions(tune=False, layout="plain") if plain else None
    build_artifact(
        model,
        preset,
        out_dir,
        manifest_fields={},
        progress=False,
        report=notices.append,
        tuning=tuning,
    )
    if not plain:
        # fp32 convolutions get the blocked NEON template's default tiles (no database here)
        assert any("convolution template's default tiles" in notice for notice in notices)
    return out_dir


@needs_cross
def test_arm_build_is_an_aarch64_shared_object(tmp_path: Path, rng: np.random.Generator) -> None:
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = _tiny_conv_model(rng)
    mod, _ = relax.frontend.detach_params(from_onnx(model, keep_params_in_input=True))
    library = build_arm_library(mod, "arm:cortex-a55", tmp_path / "lib" / "model.so")
    assert _toolchain.elf_machine(library) == _toolchain.EM_AARCH64
    assert [p.name for p in library.parent.iterdir()] == ["model.so"], "temporary files left"


@needs_cross
def test_arm_target_phases_write_an_aarch64_artifact(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    artifact = _build_arm_artifact(_tiny_conv_model(rng), "arm:cortex-a76", tmp_path / "a76")
    assert _toolchain.elf_machine(artifact / "model.so") == _toolchain.EM_AARCH64
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"]["name"] == "arm:cortex-a76"
    assert manifest["target"]["machine"] == "aarch64"
    assert manifest["target"]["tvm_target"]["mcpu"] == "cortex-a76"
    assert manifest["build"]["num_threads"] == 4


def test_arm_targets_are_registered() -> None:
    from detc.targets.arm.target import ArmTarget
    from detc.targets.target import available_targets, resolve_target

    names = {info.name for info in available_targets()}
    assert set(ARM_PRESETS) <= names
    target = resolve_target("arm:Neoverse-N1")
    assert isinstance(target, ArmTarget) and target.name == "arm:neoverse-n1"
    assert target.tvm_target_json(8)["num-cores"] == 8
    assert resolve_target("arm").name == "arm"
    with pytest.raises(BadInputError, match="unknown ARM target 'arm:m1'"):
        resolve_target("arm:m1")


@needs_cross
@needs_qemu
@pytest.mark.parametrize("preset", sorted(EXPECTED_FEATURES))
def test_emulated_run_matches_onnxruntime(
    preset: str, tmp_path: Path, rng: np.random.Generator
) -> None:
    # The first call prepares the emulation environment in the detc cache; later ones reuse it.
    model = _tiny_conv_model(rng)
    artifact = _build_arm_artifact(model, preset, tmp_path / "artifact")
    feed_sets = [{"images": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    results = _emulator.run_emulated_batch(artifact, feed_sets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert len(results) == len(feed_sets)
    for feeds, result in zip(feed_sets, results, strict=True):
        (expected,) = session.run(None, feeds)
        assert set(result) == {"out"}
        assert result["out"].dtype == np.float32
        np.testing.assert_allclose(result["out"], expected, rtol=RTOL, atol=ATOL)
    # Distinct inputs must give distinct outputs (the runner does not reuse one input set).
    assert not np.array_equal(results[0]["out"], results[1]["out"])
    single = _emulator.run_emulated(artifact, feed_sets[2])
    np.testing.assert_array_equal(single["out"], results[2]["out"])


@needs_cross
@needs_qemu
def test_runner_failure_is_one_line_with_the_runner_message(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    artifact = _build_arm_artifact(_tiny_conv_model(rng), "arm", tmp_path / "artifact", plain=True)
    # A weight of the wrong shape passes the host but fails the VM's shape check on aarch64.
    np.savez(
        artifact / "params.npz",
        p00000=np.zeros((4, 3, 5, 5), np.float32),
        p00001=np.zeros(4, np.float32),
    )
    feeds = {"images": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    with pytest.raises(_emulator.EmulatedRunError, match="detc-aarch64-runner: error") as info:
        _emulator.run_emulated(artifact, feeds)
    assert "\n" not in str(info.value)


def _write_inputs_only_manifest(artifact: Path, images: list[int], out: list[int]) -> None:
    """The manifest of an arm artifact whose main() takes the input "images" only."""
    manifest = {
        "format": "detc-artifact",
        "format_version": 1,
        "target": {"name": "arm", "machine": "aarch64"},
        "library": "model.so",
        "library_sha256": hashlib.sha256((artifact / "model.so").read_bytes()).hexdigest(),
        "inputs": [{"name": "images", "shape": images, "dtype": "float32"}],
        "outputs": [{"name": "out", "shape": out, "dtype": "float32"}],
        "params": {"file": "params.npz", "count": 0},
        "calling_convention": "inputs",
    }
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_feeds_are_checked_before_emulating(tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.so").write_bytes(_fake_elf(_toolchain.EM_AARCH64))
    _write_inputs_only_manifest(artifact, [1, 3, 8, 8], [1, 4, 8, 8])
    good = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(BadInputError, match="lacks input 'images'"):
        _emulator.run_emulated(artifact, {})
    with pytest.raises(BadInputError, match="unknown input 'extra'"):
        _emulator.run_emulated(artifact, {"images": good, "extra": good})
    with pytest.raises(BadInputError, match="is float64"):
        _emulator.run_emulated(artifact, {"images": good.astype(np.float64)})
    with pytest.raises(BadInputError, match="has shape"):
        _emulator.run_emulated(artifact, {"images": np.zeros((1, 3, 4, 4), np.float32)})
    (artifact / "model.so").write_bytes(_fake_elf(_toolchain.EM_X86_64))
    with pytest.raises(BadInputError, match="not an aarch64 library"):
        _emulator.run_emulated(artifact, {"images": good})


def test_emulated_run_without_qemu_names_the_install_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.so").write_bytes(_fake_elf(_toolchain.EM_AARCH64))
    _write_inputs_only_manifest(artifact, [2], [2])
    monkeypatch.setenv("DETC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainMissingError, match=r"apt-get install qemu-user"):
        _emulator.run_emulated(artifact, {"images": np.zeros(2, np.float32)})


def test_env_is_prepared_once_under_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_emulator, "require_qemu_aarch64", lambda: "/usr/bin/qemu-aarch64")
    fake_compiler = _toolchain.CrossCompiler("gcc", "/usr/bin/cc", "/usr/bin/c++", (), "test")
    monkeypatch.setattr(_emulator, "find_aarch64_cross_compiler", lambda **_: fake_compiler)
    preparations: list[Path] = []
    started = threading.Event()

    def slow_prepare(staging: Path, compiler: _toolchain.CrossCompiler) -> None:
        preparations.append(staging)
        started.set()
        threading.Event().wait(0.3)  # let the other threads reach the lock meanwhile
        (staging / "env.json").write_text("{}")

    monkeypatch.setattr(_emulator, "_prepare_env", slow_prepare)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(_emulator.ensure_emulation_env()))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(preparations) == 1
    assert len(set(results)) == 1 and len(results) == 4
    env = results[0]
    assert (env / "env.json").is_file()
    assert not preparations[0].exists(), "the staging directory was renamed into place"
    assert not list(env.parent.glob(".*.tmp-*"))


def test_failed_preparation_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_emulator, "require_qemu_aarch64", lambda: "/usr/bin/qemu-aarch64")
    fake_compiler = _toolchain.CrossCompiler("gcc", "/usr/bin/cc", "/usr/bin/c++", (), "test")
    monkeypatch.setattr(_emulator, "find_aarch64_cross_compiler", lambda **_: fake_compiler)

    def failing_prepare(staging: Path, compiler: _toolchain.CrossCompiler) -> None:
        (staging / "half-written").write_text("x")
        raise ToolchainMissingError("download failed")

    monkeypatch.setattr(_emulator, "_prepare_env", failing_prepare)
    with pytest.raises(ToolchainMissingError, match="download failed"):
        _emulator.ensure_emulation_env()
    emulation = tmp_path / "emulation"
    assert [p.name for p in emulation.iterdir() if not p.name.endswith(".lock")] == []
    assert _emulator.emulation_env_status() is None


@needs_cross
def test_the_compile_line_says_a_board_tunes_an_arm_build(tmp_path: Path) -> None:
    import subprocess
    import sys

    onnx.save(_tiny_conv_model(np.random.default_rng(0)), tmp_path / "m.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", "compile", str(tmp_path / "m.onnx"),
         "--target", "arm", "-o", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "a board tunes them: --tune --rpc-tracker" in done.stdout
    assert "--tune searches" not in done.stdout
