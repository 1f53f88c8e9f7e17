"""distill and torch_graph: the torch executor against onnxruntime, training towards a teacher,
failure modes."""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from detc.compiler.errors import BadInputError
from detc.compiler.tolerances import FP32_EXACT
from detc.passes.distill import DistillSettings, distill, distill_targets
from detc.passes.torch_graph import TorchGraph
from tests._models import (
    assert_outputs_close,
    constant_node,
    make_model,
    random_inputs,
    run_ort,
    to_proto,
    value_info,
)
from tests.passes.prune.test_groups import _conv, _silu

torch = pytest.importorskip("torch")


def zoo(rng: np.random.Generator) -> ir.Model:
    """Every op a YOLO-style graph is made of, one after the other, on a (1, 4, 8, 8) input."""
    inits: dict[str, np.ndarray] = {
        "scales": np.array([1, 1, 2, 2], np.float32),
        "split": np.array([2, 6], np.int64),
        "starts": np.array([1], np.int64),
        "ends": np.array([7], np.int64),
        "axes": np.array([3], np.int64),
        "shape": np.array([1, 2, 3, -1], np.int64),
        "two": np.array(2.0, np.float32),
    }
    nodes = [
        _conv(rng, inits, "a", "x", 4, 8, kernel=3),
        *_silu("a", "a_act"),
        helper.make_node(
            "MaxPool", ["a_act"], ["pool"], name="pool", kernel_shape=[5, 5], pads=[2, 2, 2, 2]
        ),
        helper.make_node("Concat", ["a_act", "pool"], ["cat"], name="cat", axis=1),
        _conv(rng, inits, "down", "cat", 16, 8, kernel=3),
        helper.make_node("LeakyRelu", ["down"], ["leaky"], name="leaky", alpha=0.1),
        helper.make_node(
            "Resize",
            ["leaky", "", "scales"],
            ["up"],
            name="up",
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        helper.make_node("Split", ["up", "split"], ["s0", "s1"], name="split", axis=1),
        helper.make_node("Relu", ["s1"], ["s1_relu"], name="relu"),
        constant_node("half", np.array(0.5, np.float32)),
        helper.make_node("Sub", ["s1_relu", "half"], ["centred"], name="sub"),
        helper.make_node("Div", ["centred", "two"], ["halved"], name="div"),
        helper.make_node("Pow", ["s0", "two"], ["squared"], name="pow"),
        helper.make_node("Identity", ["squared"], ["same"], name="identity"),
        helper.make_node("Slice", ["halved", "starts", "ends", "axes"], ["sliced"], name="slice"),
        helper.make_node("Add", ["sliced", "half"], ["shifted"], name="add"),
        helper.make_node("Reshape", ["shifted", "shape"], ["rows"], name="rows"),
        helper.make_node("Transpose", ["rows"], ["y"], name="layout", perm=[0, 1, 3, 2]),
    ]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, 4, 8, 8])],
        [
            value_info("y", np.float32, [1, 2, 96, 3]),
            value_info("same", np.float32, [1, 2, 16, 16]),
        ],
        inits,
    )


def test_torch_graph_equals_onnxruntime(rng: np.random.Generator) -> None:
    model = zoo(rng)
    feeds = random_inputs(model, rng)
    with torch.no_grad():
        actual = TorchGraph(model.graph).run(feeds, ["y", "same"])
    assert_outputs_close(
        {k: v.numpy() for k, v in actual.items()}, run_ort(model, feeds), FP32_EXACT
    )


@pytest.mark.parametrize(
    ("transform", "rounding", "scale"),
    [
        ("half_pixel", "round_prefer_floor", 1.5),
        ("asymmetric", "floor", 2.0),
        ("align_corners", "round_prefer_ceil", 0.75),
        ("pytorch_half_pixel", "ceil", 2.5),
    ],
)
def test_nearest_resize_follows_the_onnx_coordinate_rules(
    rng: np.random.Generator, transform: str, rounding: str, scale: float
) -> None:
    inits = {"scales": np.array([1, 1, scale, scale], np.float32)}
    node = helper.make_node(
        "Resize",
        ["x", "", "scales"],
        ["y"],
        mode="nearest",
        coordinate_transformation_mode=transform,
        nearest_mode=rounding,
    )
    side = int(np.floor(8 * scale))
    model = make_model(
        [node],
        [value_info("x", np.float32, [1, 2, 8, 8])],
        [value_info("y", np.float32, [1, 2, side, side])],
        inits,
    )
    feeds = random_inputs(model, rng)
    actual = TorchGraph(model.graph).run(feeds, ["y"])["y"].numpy()
    np.testing.assert_array_equal(actual, run_ort(model, feeds)["y"])


def test_an_unknown_op_is_named_in_the_error() -> None:
    model = make_model(
        [helper.make_node("Erf", ["x"], ["y"], name="odd_one")],
        [value_info("x", np.float32, [1, 2])],
        [value_info("y", np.float32, [1, 2])],
    )
    with pytest.raises(BadInputError, match=r"'odd_one' \(Erf\).*distill_steps=0"):
        TorchGraph(model.graph)


def test_without_torch_the_error_says_how_to_install_it(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(BadInputError, match=r"pip install 'detc\[torch\]'"):
        TorchGraph(zoo(rng).graph)


def student_and_teacher(rng: np.random.Generator) -> tuple[ir.Model, ir.Model]:
    """A two-Conv net and a copy whose first Conv lost half its channels (a crude prune)."""
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv(rng, inits, "a", "x", 3, 8, kernel=3), *_silu("a", "a_act")]
    nodes += [_conv(rng, inits, "b", "a_act", 8, 8), *_silu("b", "b_act")]
    nodes += [_conv(rng, inits, "head", "b_act", 8, 6)]
    nodes += [helper.make_node("Sigmoid", ["head"], ["y"], name="scores")]
    io = (
        [value_info("x", np.float32, [1, 3, 16, 16])],
        [value_info("y", np.float32, [1, 6, 16, 16])],
    )
    teacher = make_model(nodes, *io, inits)
    cut = dict(inits, a_w=inits["a_w"][:4], a_b=inits["a_b"][:4], b_w=inits["b_w"][:, :4])
    return make_model(nodes, *io, cut), teacher


def _images(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    return [rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32) for _ in range(count)]


def _error(student: ir.Model, teacher: ir.Model, images: list[np.ndarray]) -> float:
    return float(
        np.mean(
            [
                (run_ort(student, {"x": i})["y"] - run_ort(teacher, {"x": i})["y"]) ** 2
                for i in images
            ]
        )
    )


def test_targets_are_shared_conv_outputs_and_heads_go_through_the_sigmoid(
    rng: np.random.Generator,
) -> None:
    student, teacher = student_and_teacher(rng)
    targets = {t.name: t for t in distill_targets(student.graph, teacher.graph, features=True)}
    assert sorted(targets) == ["b", "head"]  # 'a' lost channels: nothing to compare it with
    assert targets["head"].head and targets["head"].sigmoid and not targets["b"].head
    heads = distill_targets(student.graph, teacher.graph, features=False)
    assert [t.name for t in heads] == ["head"]


def test_distillation_brings_the_student_closer_and_is_reproducible(
    rng: np.random.Generator,
) -> None:
    student, teacher = student_and_teacher(rng)
    images, unseen = _images(rng, 6), _images(rng, 4)
    settings = DistillSettings(steps=40, size=16, batch=2, lr=3e-3, seed=3, threads=1)
    twin = ir.serde.deserialize_model(to_proto(student))
    before = _error(student, teacher, unseen)
    result = distill(student, teacher, images, settings)
    assert result.kept and result.loss_after < 0.9 * result.loss_before
    assert _error(student, teacher, unseen) < 0.9 * before
    distill(twin, teacher, images, settings)
    for name, value in student.graph.initializers.items():
        twin_value = twin.graph.initializers[name].const_value
        assert value.const_value is not None and twin_value is not None
        np.testing.assert_array_equal(value.const_value.numpy(), twin_value.numpy())
