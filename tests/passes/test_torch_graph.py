"""torch_graph: every op the interpreter executes matches onnxruntime, one test per op; running a
slice of a graph from an intermediate value; unsupported ops refused in one line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from detc.compiler.errors import BadInputError
from tests._models import make_model, run_ort, value_info

torch = pytest.importorskip("torch")

from detc.passes.torch_graph import TorchGraph  # noqa: E402 (after the torch skip)

F32 = np.float32


@dataclass
class OpCase:
    """One node ``op`` reading input ``x`` (and ``inits``), output ``y`` of ``out_shape``."""

    node: onnx.NodeProto
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    out_dtype: type = F32
    second_input: tuple[int, ...] | None = None  # a second graph input "x2"
    inputs: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray] | None = None


def _node(op: str, inputs: list[str], **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, ["y"], name=op.lower(), **attrs)


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(0, 0.5, shape).astype(F32)


RNG = np.random.default_rng(7)
CASES: dict[str, OpCase] = {
    "Conv": OpCase(
        _node("Conv", ["x", "w", "b"], pads=[1, 1, 1, 1], strides=[2, 2]),
        (1, 4, 8, 8),
        (1, 6, 4, 4),
        {"w": _w(RNG, 6, 4, 3, 3), "b": _w(RNG, 6)},
    ),
    "Conv-grouped-same-upper": OpCase(
        _node("Conv", ["x", "w"], group=2, auto_pad="SAME_UPPER", strides=[2, 2]),
        (1, 4, 7, 7),
        (1, 4, 4, 4),
        {"w": _w(RNG, 4, 2, 2, 2)},
    ),
    "Conv-asymmetric-pads": OpCase(
        _node("Conv", ["x", "w"], pads=[0, 1, 1, 0]),
        (1, 2, 5, 5),
        (1, 3, 5, 5),
        {"w": _w(RNG, 3, 2, 2, 2)},
    ),
    "BatchNormalization": OpCase(
        _node("BatchNormalization", ["x", "g", "beta", "mean", "var"], epsilon=1e-3),
        (1, 3, 4, 4),
        (1, 3, 4, 4),
        {
            "g": _w(RNG, 3),
            "beta": _w(RNG, 3),
            "mean": _w(RNG, 3),
            "var": np.abs(_w(RNG, 3)) + 0.1,
        },
    ),
    "Sigmoid": OpCase(_node("Sigmoid", ["x"]), (1, 3, 4, 4), (1, 3, 4, 4)),
    "Relu": OpCase(_node("Relu", ["x"]), (1, 3, 4, 4), (1, 3, 4, 4)),
    "LeakyRelu": OpCase(_node("LeakyRelu", ["x"], alpha=0.1), (1, 3, 4, 4), (1, 3, 4, 4)),
    "Tanh": OpCase(_node("Tanh", ["x"]), (1, 3, 4, 4), (1, 3, 4, 4)),
    "Exp": OpCase(_node("Exp", ["x"]), (1, 3, 4, 4), (1, 3, 4, 4)),
    "HardSigmoid": OpCase(_node("HardSigmoid", ["x"], alpha=0.3), (1, 3, 4, 4), (1, 3, 4, 4)),
    "HardSwish": OpCase(_node("HardSwish", ["x"]), (1, 3, 4, 4), (1, 3, 4, 4)),
    "Clip": OpCase(
        _node("Clip", ["x", "lo", "hi"]),
        (1, 3, 4, 4),
        (1, 3, 4, 4),
        {"lo": np.array(-0.2, F32), "hi": np.array(0.4, F32)},
    ),
    "Identity": OpCase(_node("Identity", ["x"]), (1, 3, 4, 4), (1, 3, 4, 4)),
    "Add": OpCase(_node("Add", ["x", "c"]), (1, 3, 4, 4), (1, 3, 4, 4), {"c": _w(RNG, 1, 3, 1, 1)}),
    "Sub": OpCase(_node("Sub", ["x", "c"]), (1, 3, 4, 4), (1, 3, 4, 4), {"c": _w(RNG, 4)}),
    "Mul": OpCase(_node("Mul", ["x", "x2"]), (1, 3, 4, 4), (1, 3, 4, 4), second_input=(1, 3, 4, 4)),
    "Div": OpCase(
        _node("Div", ["x", "c"]), (1, 3, 4, 4), (1, 3, 4, 4), {"c": np.abs(_w(RNG, 4)) + 0.5}
    ),
    "Pow": OpCase(
        _node("Pow", ["x", "c"]),
        (1, 3, 4, 4),
        (1, 3, 4, 4),
        {"c": np.array(2.0, F32)},
    ),
    "Softmax": OpCase(_node("Softmax", ["x"], axis=1), (1, 3, 4, 4), (1, 3, 4, 4)),
    "Cast": OpCase(
        _node("Cast", ["x"], to=onnx.TensorProto.INT64),
        (1, 3, 4, 4),
        (1, 3, 4, 4),
        out_dtype=np.int64,
        inputs=lambda rng, shape: rng.uniform(-5, 5, shape).astype(F32),
    ),
    "MaxPool": OpCase(
        _node("MaxPool", ["x"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]), (1, 3, 8, 8), (1, 3, 8, 8)
    ),
    "MaxPool-strided-ceil": OpCase(
        _node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        (1, 3, 7, 7),
        (1, 3, 4, 4),
    ),
    "GlobalAveragePool": OpCase(_node("GlobalAveragePool", ["x"]), (1, 3, 4, 4), (1, 3, 1, 1)),
    "GlobalMaxPool": OpCase(_node("GlobalMaxPool", ["x"]), (1, 3, 4, 4), (1, 3, 1, 1)),
    "Resize-asymmetric-floor": OpCase(
        helper.make_node(
            "Resize",
            ["x", "", "scales"],
            ["y"],
            name="resize",
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        (1, 3, 4, 4),
        (1, 3, 8, 8),
        {"scales": np.array([1, 1, 2, 2], F32)},
    ),
    "Resize-half-pixel-sizes": OpCase(
        helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="resize", mode="nearest"),
        (1, 3, 4, 6),
        (1, 3, 6, 9),
        {"sizes": np.array([1, 3, 6, 9], np.int64)},
    ),
    "Concat": OpCase(
        _node("Concat", ["x", "x2"], axis=1), (1, 3, 4, 4), (1, 5, 4, 4), second_input=(1, 2, 4, 4)
    ),
    "Reshape": OpCase(
        _node("Reshape", ["x", "shape"]),
        (1, 6, 4, 4),
        (1, 3, 2, 16),
        {"shape": np.array([0, 3, -1, 16], np.int64)},
    ),
    "Flatten": OpCase(_node("Flatten", ["x"], axis=2), (1, 3, 4, 4), (3, 16)),
    "Transpose": OpCase(_node("Transpose", ["x"], perm=[0, 2, 3, 1]), (1, 3, 4, 5), (1, 4, 5, 3)),
    "Slice": OpCase(
        _node("Slice", ["x", "starts", "ends", "axes", "steps"]),
        (1, 3, 8, 8),
        (1, 3, 3, 8),
        {
            "starts": np.array([1], np.int64),
            "ends": np.array([7], np.int64),
            "axes": np.array([2], np.int64),
            "steps": np.array([2], np.int64),
        },
    ),
    "Gather": OpCase(
        _node("Gather", ["x", "idx"], axis=1),
        (1, 4, 3, 3),
        (1, 2, 3, 3),
        {"idx": np.array([3, -4], np.int64)},
    ),
    "Unsqueeze": OpCase(
        _node("Unsqueeze", ["x", "axes"]),
        (3, 4),
        (1, 3, 1, 4),
        {"axes": np.array([0, 2], np.int64)},
    ),
    "Squeeze": OpCase(
        _node("Squeeze", ["x", "axes"]), (1, 3, 1, 4), (3, 4), {"axes": np.array([0, 2], np.int64)}
    ),
}


def _run_case(case: OpCase, rng: np.random.Generator) -> tuple[dict, dict]:
    inputs = [value_info("x", F32, case.in_shape)]
    feeds = {
        "x": case.inputs(rng, case.in_shape)
        if case.inputs
        else rng.uniform(-2, 2, case.in_shape).astype(F32)
    }
    if case.second_input is not None:
        inputs.append(value_info("x2", F32, case.second_input))
        feeds["x2"] = rng.uniform(-2, 2, case.second_input).astype(F32)
    model = make_model(
        [case.node], inputs, [value_info("y", case.out_dtype, case.out_shape)], case.inits
    )
    expected = run_ort(model, feeds)
    got = TorchGraph(model.graph).run(feeds, ["y"])
    return expected, {name: value.detach().numpy() for name, value in got.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name: str) -> None:
    expected, got = _run_case(CASES[name], np.random.default_rng(0))
    assert got["y"].shape == expected["y"].shape
    assert got["y"].dtype == expected["y"].dtype
    np.testing.assert_allclose(got["y"], expected["y"], rtol=1e-5, atol=1e-5)


def test_split_matches_onnxruntime() -> None:
    node = helper.make_node("Split", ["x", "sizes"], ["a", "b"], name="split", axis=1)
    model = make_model(
        [node],
        [value_info("x", F32, (1, 5, 2, 2))],
        [value_info("a", F32, (1, 2, 2, 2)), value_info("b", F32, (1, 3, 2, 2))],
        {"sizes": np.array([2, 3], np.int64)},
    )
    feeds = {"x": np.random.default_rng(1).normal(size=(1, 5, 2, 2)).astype(F32)}
    expected = run_ort(model, feeds)
    got = TorchGraph(model.graph).run(feeds, ["a", "b"])
    for name in ("a", "b"):
        np.testing.assert_array_equal(got[name].numpy(), expected[name])


def test_shape_matches_onnxruntime() -> None:
    node = helper.make_node("Shape", ["x"], ["y"], name="shape", start=1)
    model = make_model(
        [node], [value_info("x", F32, (1, 3, 4, 5))], [value_info("y", np.int64, (3,))]
    )
    feeds = {"x": np.zeros((1, 3, 4, 5), F32)}
    np.testing.assert_array_equal(
        TorchGraph(model.graph).run(feeds, ["y"])["y"].numpy(), run_ort(model, feeds)["y"]
    )


def _chain() -> tuple[TorchGraph, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="c2"),
    ]
    model = make_model(
        nodes,
        [value_info("x", F32, (1, 2, 4, 4))],
        [value_info("y", F32, (1, 2, 4, 4))],
        {"w1": _w(rng, 3, 2, 1, 1), "w2": _w(rng, 2, 3, 1, 1)},
    )
    return TorchGraph(model.graph, trainable=True), {"x": rng.normal(size=(1, 2, 4, 4)).astype(F32)}


def test_a_given_intermediate_value_is_not_recomputed() -> None:
    graph, feeds = _chain()
    whole = graph.run(feeds, ["a", "y"])
    from_middle = graph.run({"a": whole["a"].detach()}, ["y"])
    torch.testing.assert_close(from_middle["y"], whole["y"])
    assert [n.name for n in graph.nodes_between(["a"], ["y"])] == ["sig", "c2"]
    shifted = graph.run({"a": whole["a"].detach() + 1.0}, ["y"])["y"]
    assert not torch.allclose(shifted, whole["y"])


def test_unsupported_op_is_refused_naming_it() -> None:
    node = helper.make_node("Erf", ["x"], ["y"], name="erf_1")
    model = make_model([node], [value_info("x", F32, (2,))], [value_info("y", F32, (2,))])
    with pytest.raises(BadInputError, match=r"erf_1.*Erf"):
        TorchGraph(model.graph)
