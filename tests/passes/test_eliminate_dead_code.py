"""eliminate-dead-code: structure, numbers against onnxruntime, and what it must keep."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from detc.compiler.tolerances import FP32_EXACT
from detc.passes import EliminateDeadCodePass
from tests._models import (
    assert_outputs_close,
    explain_reasons,
    make_model,
    op_types,
    random_inputs,
    run_ort,
    value_info,
)

SHAPE = [1, 3, 4, 4]


def _model(rng: np.random.Generator) -> ir.Model:
    """y = relu(x) + w;  a dead chain (Sigmoid → Neg reading 'dead_w') and an unused opset."""
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "w"], ["y"], name="add"),
            helper.make_node("Mul", ["r", "dead_w"], ["s"], name="dead_mul"),
            helper.make_node("Neg", ["s"], ["n"], name="dead_neg"),
            helper.make_node("Dropout", ["y"], ["unused_copy", "unused_mask"], name="dead_dropout"),
        ],
        [value_info("x", np.float32, SHAPE)],
        [value_info("y", np.float32, SHAPE)],
        {
            "w": rng.normal(size=SHAPE).astype(np.float32),
            "dead_w": rng.normal(size=SHAPE).astype(np.float32),
            "unused": rng.normal(size=3).astype(np.float32),
        },
    )
    model.opset_imports["com.example.unused"] = 1
    return model


def test_dead_nodes_initializers_and_opsets_go(rng: np.random.Generator) -> None:
    model = _model(rng)
    reasons = explain_reasons(EliminateDeadCodePass(), model)
    assert {n for n, r in reasons.items() if not r} == {"dead_mul", "dead_neg", "dead_dropout"}

    result = EliminateDeadCodePass()(model)

    assert result.modified
    assert op_types(model) == ["Relu", "Add"]
    assert sorted(model.graph.initializers) == ["w"]
    assert dict(model.opset_imports) == {"": 17}
    assert [v.name for v in model.graph.outputs] == ["y"]
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert EliminateDeadCodePass()(model).modified is False


def test_result_matches_onnxruntime(rng: np.random.Generator) -> None:
    model = _model(rng)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    assert EliminateDeadCodePass()(model).modified

    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


def test_keeps_what_an_output_needs_and_says_why(rng: np.random.Generator) -> None:
    model = _model(rng)
    reasons = explain_reasons(EliminateDeadCodePass(), model)
    assert reasons["relu"] == "output 'r' is read by Add 'add'"
    assert reasons["add"] == "output 'y' is a graph output"


def test_trimming_an_unused_optional_output_counts_as_a_change(rng: np.random.Generator) -> None:
    """onnx-ir drops an unread Dropout mask without reporting it; detc's pass reports it."""
    model = make_model(
        [helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop")],
        [value_info("x", np.float32, SHAPE)],
        [value_info("y", np.float32, SHAPE)],
    )

    assert EliminateDeadCodePass()(model).modified

    (dropout,) = list(model.graph)
    assert [v.name for v in dropout.outputs] == ["y"]
    assert EliminateDeadCodePass()(model).modified is False
