"""The contract every exact pass keeps, checked on every exact pass the registry knows.

A new exact pass (built in or a plugin) is checked here without a line of test code: on one
model that gives each of them something to do, the pass must

* compute what onnxruntime computes on the original graph (``FP32_EXACT``);
* be idempotent: a second run modifies nothing and leaves the same graph;
* leave a model ``onnx.checker`` accepts with ``full_check`` (at the old and a recent opset);
* explain itself: ``explain`` is pure, answers for each candidate (fires, or a reason), names
  real nodes, says something fires where the pass rewrites, and nothing once it has run.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from detc.compiler.ir.pass_base import DetcPass
from detc.compiler.ir.registry import all_passes
from detc.compiler.tolerances import FP32_EXACT
from tests._models import (
    assert_outputs_close,
    batchnorm_params,
    constant_node,
    conv_params,
    make_model,
    random_inputs,
    run_ort,
    to_proto,
    value_info,
)

EXACT_PASSES = sorted(name for name, cls in all_passes().items() if cls.exact)
#: opset 11 is the oldest detectors are commonly exported at; 17 is what the other tests use
OPSETS = (11, 17)
CHANNELS, SIZE = 8, 6


def every_exact_rewrite_model(rng: np.random.Generator, opset: int) -> ir.Model:
    """x → Conv+BatchNormalization → Identity → Conv·scale+shift → Dropout → ·(2·0.5) → Reshape
    to its own Shape → y, beside a dead Relu of x: something for each exact pass to do."""
    weight1, bias1 = conv_params(
        rng, in_channels=4, out_channels=CHANNELS, groups=1, kernel=3, dtype=np.float32
    )
    weight2, bias2 = conv_params(
        rng, in_channels=CHANNELS, out_channels=CHANNELS, groups=1, kernel=3, dtype=np.float32
    )
    initializers = {
        "w1": weight1,
        "b1": bias1,
        **batchnorm_params(rng, CHANNELS, np.float32),
        "w2": weight2,
        "b2": bias2,
        "scale": rng.uniform(0.5, 2.0, (CHANNELS, 1, 1)).astype(np.float32),
        "shift": rng.normal(0.0, 1.0, (CHANNELS, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node(
            "BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn"
        ),
        helper.make_node("Identity", ["bn_out"], ["copied"], name="identity"),
        helper.make_node("Conv", ["copied", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Mul", ["c2", "scale"], ["scaled"], name="mul"),
        helper.make_node("Add", ["scaled", "shift"], ["shifted"], name="add"),
        helper.make_node("Dropout", ["shifted"], ["dropped"], name="dropout"),
        constant_node("two", np.array([2.0], np.float32)),
        constant_node("half", np.array([0.5], np.float32)),
        helper.make_node("Mul", ["two", "half"], ["one"], name="constant_mul"),
        helper.make_node("Mul", ["dropped", "one"], ["times_one"], name="times_one"),
        # Shape of a static value folds to int64s: Constant(value_ints) is invalid before
        # opset 12, so this also checks what fold-constants writes at opset 11.
        helper.make_node("Shape", ["times_one"], ["own_shape"], name="shape"),
        helper.make_node("Reshape", ["times_one", "own_shape"], ["reshaped"], name="reshape"),
        helper.make_node("Relu", ["reshaped"], ["y"], name="relu"),
        helper.make_node("Relu", ["x"], ["unread"], name="dead"),
    ]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, 4, SIZE, SIZE])],
        [value_info("y", np.float32, [1, CHANNELS, SIZE, SIZE])],
        initializers,
        opset=opset,
    )


def graph_text(model: ir.Model) -> str:
    return onnx.printer.to_text(to_proto(model).graph)


def instantiate(name: str) -> DetcPass:
    return all_passes()[name]()


@pytest.fixture(params=OPSETS, ids=lambda opset: f"opset{opset}")
def opset(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_every_builtin_exact_pass_is_checked() -> None:
    assert {
        "eliminate-dead-code",
        "fold-constants",
        "fold-conv-bn",
        "fold-conv-mul-add",
        "remove-identity",
    } <= set(EXACT_PASSES)


@pytest.mark.parametrize("pass_name", EXACT_PASSES)
def test_matches_onnxruntime(pass_name: str, opset: int, rng: np.random.Generator) -> None:
    model = every_exact_rewrite_model(rng, opset)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    result = instantiate(pass_name)(model)

    assert result.modified, f"{pass_name} found nothing to do: give it work in this model"
    assert_outputs_close(run_ort(result.model, feeds), expected, FP32_EXACT)


@pytest.mark.parametrize("pass_name", EXACT_PASSES)
def test_is_idempotent(pass_name: str, opset: int, rng: np.random.Generator) -> None:
    model = instantiate(pass_name)(every_exact_rewrite_model(rng, opset)).model
    once = graph_text(model)

    again = instantiate(pass_name)(model)

    assert not again.modified
    assert graph_text(again.model) == once


@pytest.mark.parametrize("pass_name", EXACT_PASSES)
def test_result_passes_the_onnx_checker(
    pass_name: str, opset: int, rng: np.random.Generator
) -> None:
    model = instantiate(pass_name)(every_exact_rewrite_model(rng, opset)).model
    onnx.checker.check_model(to_proto(model), full_check=True)


@pytest.mark.parametrize("pass_name", EXACT_PASSES)
def test_explain_answers_for_each_candidate(
    pass_name: str, opset: int, rng: np.random.Generator
) -> None:
    model = every_exact_rewrite_model(rng, opset)
    before = graph_text(model)
    node_names = {node.name for node in model.graph}

    candidates = instantiate(pass_name).explain(model)

    assert graph_text(model) == before, "explain must not change the model"
    assert candidates, f"{pass_name} explains no candidate on a model it rewrites"
    for candidate in candidates:
        assert candidate.node in node_names, candidate
        assert candidate.op_type, candidate
        # a node that does not fire says why; one that fires needs no reason
        assert candidate.fires == (not candidate.reason), candidate
        assert str(candidate)
    firing = {c.node for c in candidates if c.fires}
    assert firing, f"{pass_name} rewrites this model but explain says nothing fires"

    instantiate(pass_name)(model)
    fires_again = [str(c) for c in instantiate(pass_name).explain(model) if c.fires]
    assert not fires_again, f"explain still fires after {pass_name} ran: {fires_again}"
