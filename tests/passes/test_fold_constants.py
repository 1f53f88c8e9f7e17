"""fold-constants: structure, numbers against onnxruntime, options, and what it must not fold."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from detc.compiler import BadInputError, parse_pipeline
from detc.compiler.tolerances import FP32_EXACT
from detc.passes import FoldConstantsPass
from tests._models import (
    assert_outputs_close,
    constant,
    explain_reasons,
    make_model,
    op_types,
    random_inputs,
    run_ort,
    value_info,
)

SHAPE = [1, 3, 4, 4]


def _model(rng: np.random.Generator) -> ir.Model:
    """y = (x + unsqueeze(c * c2)) * expand(1.5, shape);  shape_out = float(shape(x))."""
    return make_model(
        [
            helper.make_node(
                "Constant",
                [],
                ["c"],
                name="c_scale",
                value=onnx.numpy_helper.from_array(rng.normal(size=3).astype(np.float32)),
            ),
            helper.make_node("Mul", ["c", "c2"], ["d"], name="mul_const"),
            helper.make_node("Unsqueeze", ["d", "axes"], ["e"], name="unsqueeze"),
            helper.make_node("Add", ["x", "e"], ["f"], name="add_x"),
            helper.make_node("Expand", ["one_and_half", "shape"], ["g"], name="expand"),
            helper.make_node("Mul", ["f", "g"], ["y"], name="mul_x"),
            helper.make_node("Shape", ["x"], ["x_shape"], name="shape_x"),
            helper.make_node(
                "Cast", ["x_shape"], ["shape_out"], name="cast", to=onnx.TensorProto.FLOAT
            ),
        ],
        [value_info("x", np.float32, SHAPE)],
        [value_info("y", np.float32, SHAPE), value_info("shape_out", np.float32, [4])],
        {
            "c2": rng.normal(size=3).astype(np.float32),
            "axes": np.array([1, 2], np.int64),
            "one_and_half": np.array(1.5, np.float32),
            "shape": np.array(SHAPE, np.int64),
        },
    )


def _computing(model: ir.Model) -> list[str]:
    """Op types left computing something (the folder leaves dead Constant nodes to DCE)."""
    return [op for op in op_types(model) if op != "Constant"]


def test_constant_subexpressions_become_initializers(rng: np.random.Generator) -> None:
    model = _model(rng)
    reasons = explain_reasons(FoldConstantsPass(), model)
    assert {n for n, r in reasons.items() if not r} == {
        "mul_const",
        "unsqueeze",
        "expand",
        "shape_x",
        "cast",
    }

    result = FoldConstantsPass()(model)

    assert result.modified
    assert _computing(model) == ["Add", "Mul"]
    add, mul = [n for n in model.graph if n.op_type != "Constant"]
    assert constant(add.inputs[1]).shape == (3, 1, 1)
    assert constant(mul.inputs[1]).shape == tuple(SHAPE)
    assert [v.name for v in model.graph.outputs] == ["y", "shape_out"]
    np.testing.assert_array_equal(constant(model.graph.outputs[1]), np.array(SHAPE, np.float32))
    assert FoldConstantsPass()(model).modified is False


def test_folded_model_matches_onnxruntime(rng: np.random.Generator) -> None:
    model = _model(rng)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    assert FoldConstantsPass()(model).modified

    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


def test_size_limit_keeps_large_results_computed(rng: np.random.Generator) -> None:
    model = _model(rng)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)
    folding = parse_pipeline("fold-constants{size_limit=16}").instantiate()[0]
    assert folding.options.size_limit == 16

    assert folding(model).modified

    # Expand makes 48 elements out of 5: above the limit, so it stays; the rest folds
    assert _computing(model) == ["Add", "Expand", "Mul"]
    reasons = explain_reasons(folding, model)
    assert reasons["expand"].startswith(
        "all inputs are constant but the folder kept it (size_limit=16"
    )
    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


def test_does_not_fold_what_reads_a_graph_input(rng: np.random.Generator) -> None:
    model = _model(rng)
    reasons = explain_reasons(FoldConstantsPass(), model)
    assert reasons["add_x"] == "input 'x' comes from graph input 'x'"
    assert reasons["mul_x"] == "input 'f' comes from Add 'add_x'"

    FoldConstantsPass()(model)

    assert {n.name for n in model.graph} >= {"add_x", "mul_x"}


def test_negative_size_limit_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="size limits must be >= 0"):
        parse_pipeline("fold-constants{size_limit=-1}").instantiate()
