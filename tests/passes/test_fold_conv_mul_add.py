"""fold-conv-mul-add: structure, numbers against onnxruntime, and where it must not fire."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from detc.compiler.tolerances import FP16, FP32_EXACT
from detc.passes import FoldConvMulAddPass
from tests._models import (
    assert_outputs_close,
    constant,
    conv_mul_add_model,
    conv_params,
    explain_reasons,
    make_model,
    op_types,
    random_inputs,
    run_ort,
    value_info,
)

# keyword arguments of conv_mul_add_model; the Conv has 8 output channels
FOLDABLE: dict[str, dict[str, Any]] = {
    "mul-add-c11": {"scale_shape": (8, 1, 1), "shift_shape": (8, 1, 1)},
    "mul-add-1c11-no-bias": {
        "scale_shape": (1, 8, 1, 1),
        "shift_shape": (1, 8, 1, 1),
        "bias": False,
    },
    "mul-only-scalar": {"scale_shape": (), "shift_shape": None},
    "add-only-[1]": {"scale_shape": None, "shift_shape": (1,)},
    "constant-first-grouped": {"groups": 2, "constant_first": True},
    "depthwise-[1,1,1,1]-scale": {
        "groups": 8,
        "in_channels": 8,
        "scale_shape": (1, 1, 1, 1),
        "shift_shape": (8, 1, 1),
    },
}


@pytest.mark.parametrize("key", sorted(FOLDABLE))
def test_mul_and_add_disappear_into_the_conv(rng: np.random.Generator, key: str) -> None:
    model = conv_mul_add_model(rng, **FOLDABLE[key])
    absorbed = [op for op in op_types(model) if op in ("Mul", "Add")]
    assert absorbed

    result = FoldConvMulAddPass()(model)

    assert result.modified
    assert op_types(model) == ["Conv", "Relu"]
    conv = next(iter(model.graph))
    assert conv.outputs[0].consumers()[0].op_type == "Relu"
    weights = [v for v in conv.inputs[1:] if v is not None]
    assert len(weights) == len(conv.inputs) - 1
    assert sorted(model.graph.initializers) == sorted(str(v.name) for v in weights)
    assert FoldConvMulAddPass()(model).modified is False


@pytest.mark.parametrize("key", sorted(FOLDABLE))
def test_folded_model_matches_onnxruntime_fp32(rng: np.random.Generator, key: str) -> None:
    model = conv_mul_add_model(rng, **FOLDABLE[key])
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    assert FoldConvMulAddPass()(model).modified

    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


def test_fp16_model_folds_within_fp16_tolerance(rng: np.random.Generator) -> None:
    model = conv_mul_add_model(rng, dtype=np.float16)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    assert FoldConvMulAddPass()(model).modified

    assert constant(next(iter(model.graph)).inputs[1]).dtype == np.float16
    assert_outputs_close(run_ort(model, feeds), expected, FP16)


def _assert_untouched(model: ir.Model, node: str, reason: str) -> None:
    before = op_types(model)
    assert explain_reasons(FoldConvMulAddPass(), model)[node] == reason
    assert FoldConvMulAddPass()(model).modified is False
    assert op_types(model) == before


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ((1, 8, 8, 8), "has shape [1, 8, 8, 8], which is not per-channel"),
        ((1, 1, 8, 1), "has shape [1, 1, 8, 1], which is not per-channel"),
        ((8,), "has shape [8], which is not per-channel"),  # right-aligned: broadcasts over W
        ((2, 8, 1, 1), "has shape [2, 8, 1, 1], which is not per-channel"),
        ((1, 1, 8, 1, 1), "has rank 5, above the Conv output's 4"),
    ],
)
def test_does_not_fire_on_a_broadcast_beyond_channels(
    rng: np.random.Generator, shape: tuple[int, ...], why: str
) -> None:
    model = conv_mul_add_model(rng, scale_shape=shape, shift_shape=None, size=8)
    reason = explain_reasons(FoldConvMulAddPass(), model)["mul"]
    assert reason.startswith(f"Mul 'mul' constant 'scale' {why}"), reason
    _assert_untouched(model, "mul", reason)


def test_does_not_fire_on_a_runtime_multiplier(rng: np.random.Generator) -> None:
    weight, bias = conv_params(
        rng, in_channels=4, out_channels=8, groups=1, kernel=1, dtype=np.float32
    )
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
            helper.make_node("Mul", ["c", "gate"], ["y"], name="mul"),
        ],
        [value_info("x", np.float32, [1, 4, 3, 3]), value_info("gate", np.float32, [1, 8, 1, 1])],
        [value_info("y", np.float32, [1, 8, 3, 3])],
        {"w": weight, "b": bias},
    )
    _assert_untouched(
        model,
        "mul",
        "Mul 'mul' combines a Conv output with 'gate' from graph input 'gate', "
        "which is not a constant",
    )


def test_does_not_fire_when_conv_output_has_another_reader(rng: np.random.Generator) -> None:
    """SiLU after a Conv: x * sigmoid(x) must stay, whatever the order of the Mul's operands."""
    weight, bias = conv_params(
        rng, in_channels=4, out_channels=8, groups=1, kernel=1, dtype=np.float32
    )
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
            helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
            helper.make_node("Mul", ["c", "s"], ["m"], name="silu"),
            helper.make_node("Add", ["m", "shift"], ["y"], name="add"),
        ],
        [value_info("x", np.float32, [1, 4, 3, 3])],
        [value_info("y", np.float32, [1, 8, 3, 3])],
        {"w": weight, "b": bias, "shift": np.ones((8, 1, 1), np.float32)},
    )
    reasons = explain_reasons(FoldConvMulAddPass(), model)
    assert (
        reasons["add"]
        == "neither input of Add 'add' comes from a Conv (Mul 'silu', initializer 'shift')"
    )
    _assert_untouched(
        model,
        "silu",
        "Mul 'silu' combines a Conv output with 's' from Sigmoid 'sigmoid', "
        "which is not a constant",
    )


def test_repeats_until_nothing_more_folds(rng: np.random.Generator) -> None:
    """Stored out of order (Add before Mul), one sweep folds only the Mul; the pass repeats."""
    model = conv_mul_add_model(rng)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)
    graph = model.graph
    add = next(n for n in graph if n.op_type == "Add")
    graph.remove(add)
    graph.insert_before(next(n for n in graph if n.op_type == "Mul"), add)
    assert op_types(model) == ["Conv", "Add", "Mul", "Relu"]

    assert FoldConvMulAddPass()(model).modified

    assert op_types(model) == ["Conv", "Relu"]
    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)
