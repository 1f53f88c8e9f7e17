"""detc package: the bundle's layout and checksums, detc-run on tensor files against onnxruntime
(x86, and aarch64 under qemu with only the bundle's libraries). Images, detections and the C++
example: test_detections.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from detc.compiler.errors import BadInputError
from detc.compiler.tolerances import COMPILED_FP32
from detc.targets.bundle import Bundle, BundleIntegrityError, package_artifact
from detc.targets.bundle.package import SUMS_FILE
from detc.targets.remote.toolchain import (
    EM_AARCH64,
    EM_X86_64,
    elf_machine,
    find_qemu_aarch64,
)

from .conftest import reference_outputs, tiny_detector

AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")


def _run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _check_outputs(save_dir: Path, image: np.ndarray, names: list[str]) -> None:
    expected = reference_outputs(tiny_detector(), image)
    for index, name in enumerate(names):
        actual = np.load(save_dir / f"{index}.npy")
        assert actual.shape == expected[name].shape
        assert COMPILED_FP32.allclose(actual, expected[name]), name


def test_the_bundle_holds_the_model_runtime_and_checksums(x86_bundle: Path) -> None:
    bundle = Bundle.open(x86_bundle)
    assert bundle.architecture == "x86_64"
    assert [o["name"] for o in bundle.document["outputs"]] == ["scores", "boxes"]
    for name in (
        "lib/libdetc_runtime.so",
        "lib/libtvm_runtime.so",
        "lib/libtvm_runtime_extra.so",
        "lib/libtvm_ffi.so",
    ):
        assert elf_machine(x86_bundle / name) == EM_X86_64
    assert not (x86_bundle / "lib" / "libtvm.so").exists()  # the compiler stays on the host
    assert (x86_bundle / "include/detc_runtime.h").is_file()
    assert (x86_bundle / "example/CMakeLists.txt").is_file()
    assert list((x86_bundle / "model/params").glob("p*.bin"))  # raw params, no .npz
    listed = {line.split("  ", 1)[1] for line in (x86_bundle / SUMS_FILE).read_text().splitlines()}
    on_disk = {p.relative_to(x86_bundle).as_posix() for p in x86_bundle.rglob("*") if p.is_file()}
    assert listed == on_disk - {SUMS_FILE}
    if shutil.which("sha256sum"):  # the device can check it with coreutils alone
        assert _run("sha256sum", "-c", "--quiet", SUMS_FILE, cwd=x86_bundle).returncode == 0


def test_detc_run_matches_onnxruntime(x86_bundle: Path, image: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "image.npy", image)
    image.tofile(tmp_path / "image.bin")
    saved = tmp_path / "out"
    saved.mkdir()
    runner = x86_bundle / "bin/detc-run"
    done = _run(runner, x86_bundle, tmp_path / "image.npy", "--runs", "3", "--save", saved)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [o["name"] for o in report["outputs"]] == ["scores", "boxes"]
    assert report["outputs"][0]["shape"] == [1, 6, 16, 16]
    assert "values" not in report["outputs"][0]  # 1536 elements: a summary only
    assert 0.0 <= report["outputs"][0]["summary"]["min"] <= report["outputs"][0]["summary"]["max"]
    assert report["latency_ms"]["runs"] == 3 and report["latency_ms"]["min"] > 0
    _check_outputs(saved, image, ["scores", "boxes"])

    raw = _run(runner, x86_bundle, tmp_path / "image.bin", "--full")
    assert raw.returncode == 0, raw.stderr
    values = json.loads(raw.stdout)["outputs"][0]["values"]
    np.testing.assert_allclose(values, np.load(saved / "0.npy").ravel(), rtol=1e-6)


def test_detc_run_names_a_wrong_input(x86_bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), np.float32))
    (tmp_path / "short.bin").write_bytes(b"\0" * 12)
    for name, expected in (("small.npy", "has shape"), ("short.bin", "has 12 bytes")):
        done = _run(x86_bundle / "bin/detc-run", x86_bundle, tmp_path / name)
        assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert _run(x86_bundle / "bin/detc-run").returncode == 2


def test_a_tampered_file_is_refused_at_open(x86_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(x86_bundle, copy)
    param = sorted((copy / "model/params").glob("p*.bin"))[0]
    data = bytearray(param.read_bytes())
    data[0] ^= 0x01
    param.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"p00000\.bin does not match"):
        Bundle.open(copy)
    np.save(tmp_path / "image.npy", np.zeros((1, 3, 16, 16), np.float32))
    done = _run(copy / "bin/detc-run", copy, tmp_path / "image.npy")
    assert done.returncode == 2
    assert "p00000.bin does not match SHA256SUMS" in done.stderr


def test_package_refuses_what_it_would_overwrite(x86_artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not a detc bundle"):
        package_artifact(x86_artifact, tmp_path / "precious")
    with pytest.raises(BadInputError, match=r"manifest\.json is missing"):
        package_artifact(tmp_path / "precious", tmp_path / "out")


def _aarch64_tools_missing() -> str | None:
    if shutil.which("aarch64-linux-gnu-g++") is None:
        return "the aarch64 cross compiler (g++-aarch64-linux-gnu) is not installed"
    if find_qemu_aarch64() is None:
        return "qemu-aarch64 is not installed"
    if not (AARCH64_SYSROOT / "lib").is_dir():
        return f"{AARCH64_SYSROOT} (the aarch64 C library) is absent"
    return None


@pytest.mark.skipif(_aarch64_tools_missing() is not None, reason=str(_aarch64_tools_missing()))
def test_an_aarch64_bundle_runs_under_qemu_with_only_its_libraries(
    tmp_path: Path, image: np.ndarray
) -> None:
    from detc.compiler.errors import ToolchainMissingError
    from detc.targets import build_artifact

    artifact = tmp_path / "tiny-arm"
    build_artifact(tiny_detector(), "arm", artifact, manifest_fields={}, progress=False)
    try:
        bundle = package_artifact(artifact, tmp_path / "bundle-arm")
    except ToolchainMissingError as error:  # e.g. no network for the aarch64 wheels
        pytest.skip(str(error))
    for name in ("bin/detc-run", "lib/libdetc_runtime.so", "lib/libtvm_runtime.so"):
        assert elf_machine(bundle / name) == EM_AARCH64
    assert Bundle.open(bundle).architecture == "aarch64"

    np.save(tmp_path / "image.npy", image)
    saved = tmp_path / "out"
    saved.mkdir()
    qemu = find_qemu_aarch64()
    assert qemu is not None
    done = _run(
        qemu, "-cpu", "max", "-L", AARCH64_SYSROOT, bundle / "bin/detc-run", bundle,
        tmp_path / "image.npy", "--save", saved,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [o["name"] for o in json.loads(done.stdout)["outputs"]] == ["scores", "boxes"]
    _check_outputs(saved, image, ["scores", "boxes"])
