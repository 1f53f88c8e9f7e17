"""The zoo as a test matrix: every family, exported as a user would export it, through
``detc compile`` for x86 and arm and ``detc verify`` (arm under qemu), run as a user runs them.

The full matrix is marked ``zoo`` and ``slow`` (``pytest -m zoo``); the entries in FAST run in
the default suite. An entry that fails for a known gap in detc is ``xfail(strict=True)`` with
the gap in its reason, so the matrix passes, documents the gap, and fails once it is closed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detc.compiler.errors import ToolchainMissingError
from detc.targets.remote import toolchain
from tests.zoo.export import INPUT_NAME, Variant, ZooCache
from tests.zoo.families import FAMILIES, family

OPSETS = (11, 13, 17)
TARGETS = ("x86", "arm")


def _have_arm_toolchain() -> bool:
    toolchain.clear_toolchain_cache()
    try:
        toolchain.find_aarch64_cross_compiler(require_cxx=True)
    except ToolchainMissingError:
        return False
    return toolchain.find_qemu_aarch64() is not None


HAVE_ARM = _have_arm_toolchain()

#: the gaps in detc the zoo found, by (family, variant tag or "*", target or "*"); TopK on
#: aarch64 (tvm.contrib.sort.* live in libtvm_runtime_extra, now in the emulation environment
#: and in bundles) was the last
KNOWN_GAPS: dict[tuple[str, str, str], str] = {}


def _known_gap(name: str, variant: Variant, target: str) -> str | None:
    for key in ((name, variant.tag, target), (name, variant.tag, "*"), (name, "*", target)):
        if key in KNOWN_GAPS:
            return KNOWN_GAPS[key]
    return KNOWN_GAPS.get((name, "*", "*"))


def _entry(name: str, variant: Variant, target: str, *marks: pytest.MarkDecorator):
    gap = _known_gap(name, variant, target)
    extra = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
    return pytest.param(
        name, variant, target, marks=[*marks, *extra], id=f"{name}-{variant.tag}-{target}"
    )


#: the default suite's share: four families, opsets 11, 13 and 17, one entry on x86 and arm
FAST = [
    ("yolov5", Variant(11), "x86"),
    ("retinanet", Variant(13), "x86"),
    ("nanodet", Variant(17), "x86"),
    ("nanodet", Variant(17), "arm"),
    ("fastestdet", Variant(13), "arm"),
]

#: export forms beyond the TorchScript opset sweep, on x86, each on a few families
VARIANTS = [
    *((n, Variant(18, exporter="dynamo")) for n in ("yolov8", "ssdlite", "retinaface", "dbtext")),
    *((n, Variant(13, dynamic=True)) for n in ("yolov5", "yolox", "fcos")),
    *((n, Variant(17, fp16=True)) for n in ("yolov5", "nanodet", "blazeface")),
    *((n, Variant(11, idiom="weights-as-inputs")) for n in ("yolov5", "retinanet")),
    *((n, Variant(13, idiom="value-ints")) for n in ("yolov8", "scrfd")),
    *((n, Variant(11, idiom="empty-resize-scales")) for n in ("yolov5", "retinaface")),
    *((n, Variant(17, idiom="zero-d")) for n in ("fcos", "yolox")),
    *((n, Variant(17)) for n in ("ssdlite-raw", "retinanet-raw", "fcos-raw")),
    ("yolov8-batch2", Variant(13)),
]

_slow_zoo = (pytest.mark.zoo, pytest.mark.slow)
MATRIX = [
    *(
        _entry(name, Variant(opset), target, *_slow_zoo)
        for name in FAMILIES
        for opset in OPSETS
        for target in TARGETS
        if (name, Variant(opset), target) not in FAST
    ),
    *(_entry(name, variant, "x86", *_slow_zoo) for name, variant in VARIANTS),
]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> ZooCache:
    return ZooCache(tmp_path_factory.mktemp("zoo"))


def detc(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, f"{what} exited {result.returncode}: {result.stderr.strip()}"


def _failure_is_one_line(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) <= 1, f"exit {result.returncode} with {len(lines)} stderr lines: {lines}"


def compile_and_verify(model: Path, target: str, out: Path, variant: Variant) -> None:
    args: list[str | Path] = ["compile", model, "--target", target, "-o", out, "--quiet"]
    if variant.dynamic:
        shape = "x".join(map(str, family_shape(model)))
        args += ["--input-shape", f"{INPUT_NAME}:{shape}"]
    compiled = detc(*args)
    _failure_is_one_line(compiled)
    _check(compiled, f"detc compile --target {target}")
    assert (out / "manifest.json").is_file()
    verify_args: list[str | Path] = ["verify", out, "--reference", model]
    if target == "arm":
        verify_args.append("--emulate")
    verified = detc(*verify_args)
    _failure_is_one_line(verified)
    _check(verified, "detc verify")


def family_shape(model: Path) -> tuple[int, ...]:
    return family(model.name.split("-op")[0]).input_shape


def _run(zoo: ZooCache, tmp_path: Path, name: str, variant: Variant, target: str) -> None:
    if target == "arm" and not HAVE_ARM:
        pytest.skip("no aarch64 cross compiler or qemu-aarch64")
    compile_and_verify(zoo.get(name, variant), target, tmp_path / "artifact", variant)


@pytest.mark.parametrize(("name", "variant", "target"), [_entry(n, v, t) for n, v, t in FAST])
def test_zoo_fast(zoo: ZooCache, tmp_path: Path, name: str, variant: Variant, target: str):
    _run(zoo, tmp_path, name, variant, target)


@pytest.mark.parametrize(("name", "variant", "target"), MATRIX)
def test_zoo_matrix(zoo: ZooCache, tmp_path: Path, name: str, variant: Variant, target: str):
    _run(zoo, tmp_path, name, variant, target)


@pytest.fixture(scope="module")
def calibration_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for index in range(8):
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


#: the approximate passes on representative families (the zoo's YOLOX is the issue's case:
#: a YOLOX-style model at opset 11)
APPROXIMATE = [
    pytest.param("yolox", "quantize", id="yolox-op11-quantize"),
    pytest.param("yolox", "prune{mac_reduction=0.2}", id="yolox-op11-prune"),
    pytest.param("retinanet", "lowrank{mac_reduction=0.3}", id="retinanet-op11-lowrank"),
]


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize(("name", "approximate"), APPROXIMATE)
def test_zoo_approximate_passes_compile_and_verify(
    zoo: ZooCache, tmp_path: Path, calibration_images: Path, name: str, approximate: str
):
    """quantize (int8 held to its QDQ model), prune and lowrank (held to the graph they left)
    through compile and verify, on an opset-11 export (quantize converts it to opset 13)."""
    model = zoo.get(name, Variant(11))
    out = tmp_path / "artifact"
    pipeline = f"default,{approximate}"
    compiled = detc(
        "compile", model, "--target", "x86", "-p", pipeline, "--calib", calibration_images,
        "-o", out, "--quiet",
    )  # fmt: skip
    _failure_is_one_line(compiled)
    _check(compiled, f"detc compile -p {pipeline}")
    verified = detc("verify", out, "--reference", model)
    _check(verified, "detc verify")


def _have_nvcc() -> bool:
    from detc.targets.cuda.toolkit import find_nvcc

    return find_nvcc() is not None


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_zoo_builds_for_cuda(zoo: ZooCache, tmp_path: Path, name: str):
    """Every family builds for an H100 (the fatbin is compiled here; running it needs a GPU)."""
    if not _have_nvcc():
        pytest.skip("no CUDA compiler (nvcc)")
    out = tmp_path / "artifact"
    compiled = detc("compile", zoo.get(name, Variant(17)), "--target", "cuda:sm_90", "-o", out)
    _failure_is_one_line(compiled)
    _check(compiled, "detc compile --target cuda:sm_90")
    assert (out / "model.so").is_file()
