"""Real int8 convolutions for ``--target arm`` (kernels/conv2d_int8_arm.py) under qemu.

Each fixture is a one-convolution model quantized with onnxruntime's ``quantize_static`` (QDQ,
per-channel int8 weights; the fixtures of tests/test_int8_lowering.py), built through the arm
target's phases as ``detc compile --target <preset>`` builds it, cross-compiled and run under
qemu-aarch64 (``-cpu max`` emulates the dot-product extension). The reference is onnxruntime on
this host with graph optimizations on, i.e. its integer ``QLinearConv``: quantized outputs must
agree bit for bit, with ``sdot`` (a Cortex-A76 preset) and without (the generic preset). A SiLU
before the quantize (which onnxruntime computes in float) agrees within 1; float outputs within
the fp32 tolerance.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tvm

from detc.kernels.conv2d_int8 import assembly_of
from detc.kernels.conv2d_int8_arm import arm_int8_isa
from detc.targets import resolve_target
from detc.targets.artifact import build_artifact
from detc.targets.int8 import lower_qdq_conv2d_to_int8
from detc.targets.remote import emulator as _emulator
from detc.targets.remote import toolchain as _toolchain
from tests.targets.arm.test_arm import have_cross_compiler
from tests.targets.test_int8_lowering import (
    CASES,
    dequantized_conv_model,
    float_conv_model,
    import_bound,
    input_batch,
    insert_silu,
    quantize_qdq,
    relax_ops,
    run_onnxruntime,
)

#: kernel variant → an arm preset that selects it
PRESETS = {"sdot": "arm:cortex-a76", "neon": "arm"}
#: symbol of the int8 kernel in the exported library (the PrimFunc the lowering adds)
KERNEL_SYMBOL = b"conv2d_int8"


needs_emulation = pytest.mark.skipif(
    not have_cross_compiler() or _toolchain.find_qemu_aarch64() is None,
    reason="no aarch64 cross compiler (gcc-aarch64-linux-gnu) or qemu-aarch64 (qemu-user)",
)


def build_and_emulate(
    model: onnx.ModelProto, preset: str, batches: list[np.ndarray], out_dir: Path
) -> list[np.ndarray]:
    """The arm artifact of ``model`` (as ``detc compile``), run under qemu on each batch."""
    build_artifact(
        model, preset, out_dir, manifest_fields={}, progress=False, report=lambda _: None
    )
    assert KERNEL_SYMBOL in (out_dir / "model.so").read_bytes(), "no int8 kernel in the library"
    results = _emulator.run_emulated_batch(out_dir, [{"x": x} for x in batches])
    return [next(iter(result.values())) for result in results]


# ---- numerics under emulation ------------------------------------------------------------------

EMULATED_CASES: dict[str, dict[str, Any]] = {
    **{name: {"shape": shape, "activations": "uint8"} for name, shape in CASES.items()},
    "int8-activations-stride2": {"shape": {"stride": 2}, "activations": "int8"},
}


@needs_emulation
@pytest.mark.parametrize("variant", sorted(PRESETS))
@pytest.mark.parametrize("case", list(EMULATED_CASES))
def test_emulated_int8_conv_is_bit_exact_with_onnxruntime(
    case: str, variant: str, tmp_path: Path
) -> None:
    spec = EMULATED_CASES[case]
    rng = np.random.default_rng(list(EMULATED_CASES).index(case))
    model = quantize_qdq(
        float_conv_model(rng, **spec["shape"]), rng, tmp_path, activations=spec["activations"]
    )
    batches = [input_batch(rng, model) for _ in range(2)]
    got = build_and_emulate(model, PRESETS[variant], batches, tmp_path / "artifact")
    for x, result in zip(batches, got, strict=True):
        expected = run_onnxruntime(model, x)
        assert result.dtype == expected.dtype == np.dtype(spec["activations"])
        assert np.unique(expected).size > 16  # a near-constant output would prove little
        np.testing.assert_array_equal(result, expected)


@needs_emulation
@pytest.mark.parametrize(
    ("variant", "shape"),
    [("sdot", {}), ("neon", {"in_channels": 3, "out_channels": 24, "stride": 2})],
)
def test_emulated_float_outputs_within_fp32_tolerance(
    variant: str, shape: dict[str, Any], tmp_path: Path
) -> None:
    """DQ → Conv with a float output (detc's quantize pass by default): exact integer sums,
    dequantized once; onnxruntime sums float products."""
    rng = np.random.default_rng(11)
    model = dequantized_conv_model(rng, tmp_path, **shape)
    x = input_batch(rng, model)
    (got,) = build_and_emulate(model, PRESETS[variant], [x], tmp_path / "artifact")
    expected = run_onnxruntime(model, x)
    assert got.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_emulation
def test_emulated_silu_before_the_quantize_is_within_one_of_onnxruntime(tmp_path: Path) -> None:
    """Conv → SiLU → Q (every YOLO block) as one kernel with a uint8 output; onnxruntime runs
    the SiLU in float between its convolution and quantize, so a value at a rounding boundary
    may differ by 1."""
    rng = np.random.default_rng(12)
    model = quantize_qdq(float_conv_model(rng, out_channels=24), rng, tmp_path)
    insert_silu(model)
    x = input_batch(rng, model)
    (got,) = build_and_emulate(model, PRESETS["sdot"], [x], tmp_path / "artifact")
    expected = run_onnxruntime(model, x)
    assert got.dtype == expected.dtype == np.uint8
    assert np.unique(expected).size > 16
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and np.mean(difference == 0) > 0.99


@needs_emulation
def test_emulated_silu_on_a_float_output_within_fp32_tolerance(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    model = dequantized_conv_model(rng, tmp_path, in_channels=5, out_channels=12)
    insert_silu(model)
    x = input_batch(rng, model)
    (got,) = build_and_emulate(model, PRESETS["neon"], [x], tmp_path / "artifact")
    np.testing.assert_allclose(got, run_onnxruntime(model, x), rtol=1e-4, atol=1e-5)


# ---- the generated code (compiled, not run: needs no toolchain) --------------------------------


def _arm_assembly(model: onnx.ModelProto, preset: str) -> tuple[str, list[str]]:
    """The assembly of ``model`` built by the arm target's legalize passes (which start with
    the int8 lowering), and the Relax ops right after that lowering."""
    arm = resolve_target(preset)
    target = tvm.target.Target(arm.tvm_target_json(1))
    mod, remaining = import_bound(model)
    assert remaining == []
    with target:
        lowered = lower_qdq_conv2d_to_int8()(mod)
        legalized = tvm.transform.Sequential(arm.legalize_passes())(mod)
    return assembly_of(tvm.compile(legalized, target=target)), relax_ops(lowered)


def _count(instruction: str, assembly: str) -> int:
    return len(re.findall(rf"^\s*{instruction}\s", assembly, flags=re.MULTILINE))


@pytest.mark.parametrize("preset", ["arm", "arm:cortex-a53", "arm:cortex-a55", "arm:neoverse-n1"])
def test_sdot_appears_exactly_when_the_preset_has_dotprod(preset: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    model = quantize_qdq(float_conv_model(rng, size=6), rng, tmp_path)
    assembly, ops = _arm_assembly(model, preset)
    assert ops == ["relax.quantize", "relax.call_tir"]
    target = tvm.target.Target(resolve_target(preset).tvm_target_json(1))
    has_dotprod = "+dotprod" in resolve_target(preset).tvm_target_json(1)["mattr"]
    assert arm_int8_isa(target).dotprod == has_dotprod
    assert (_count("sdot", assembly) > 0) == has_dotprod
    if not has_dotprod:
        # Exact widening products (int8 × int8 → int16), pairs summed in int32.
        assert _count("smull2?", assembly) > 0 and _count("saddlp", assembly) > 0
