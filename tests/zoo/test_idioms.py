"""The zoo's idiom rewrites make the idiom they name and keep the numbers; the front end's
ConstantOfShape rewrite (PyTorch's F.pad) is exact and fires only where it may; detc refuses
unsupported operators in one line that names every node."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.frontend import load_model
from detc.compiler.frontend.legalize import CONSTANT_OF_SHAPE_LIMIT
from tests.zoo.export import (
    INPUT_NAME,
    Variant,
    ZooCache,
    constants_as_value_ints,
    resize_scales_as_sizes,
    scalars_as_zero_d,
)
from tests.zoo.families import family


def _run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def fastestdet_op13(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ZooCache(tmp_path_factory.mktemp("zoo")).get("fastestdet", Variant(13))


def _idiom_count(model: onnx.ModelProto, idiom: str) -> int:
    if idiom == "value-ints":
        return sum(
            1
            for n in model.graph.node
            for a in n.attribute
            if a.name in ("value_ints", "value_int")
        )
    if idiom == "empty-resize-scales":
        return sum(1 for n in model.graph.node if n.op_type == "Resize" and len(n.input) == 4)
    return sum(1 for i in model.graph.initializer if not i.dims) + sum(
        1
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute[0].name == "value" and not n.attribute[0].t.dims
    )


@pytest.mark.parametrize(
    ("idiom", "rewrite"),
    [
        ("value-ints", constants_as_value_ints),
        ("empty-resize-scales", resize_scales_as_sizes),
        ("zero-d", scalars_as_zero_d),
    ],
)
def test_idiom_rewrite_makes_the_idiom_and_keeps_the_numbers(
    fastestdet_op13: Path, idiom: str, rewrite: Callable[[onnx.ModelProto], int]
):
    original = onnx.load(str(fastestdet_op13))
    model = onnx.load(str(fastestdet_op13))
    before = _idiom_count(model, idiom)
    assert rewrite(model) > 0
    onnx.checker.check_model(model, full_check=True)
    assert _idiom_count(model, idiom) > before
    x = np.random.default_rng(0).standard_normal(family("fastestdet").input_shape)
    feeds = {INPUT_NAME: x.astype(np.float32)}
    for got, want in zip(_run(model, feeds), _run(original, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def _padded_model(shape_input: str, pad_channels: int = 2) -> onnx.ModelProto:
    """F.pad's TorchScript spelling: pads = Concat(constant, ConstantOfShape(shape_input));
    ``two`` is a constant [2], ``x_shape`` the input's channel count computed by Shape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape", start=1, end=2),
        helper.make_node(
            "ConstantOfShape",
            [shape_input],
            ["zeros"],
            name="zeros",
            value=numpy_helper.from_array(np.zeros(1, np.int64)),
        ),
        helper.make_node("Concat", ["lead", "zeros"], ["pads"], name="pads", axis=0),
        helper.make_node("Pad", ["x", "pads"], ["y"], name="pad"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 + pad_channels, 3, 3])],
        [
            numpy_helper.from_array(np.array([0, 0, 0, 0, 0, pad_channels], np.int64), "lead"),
            numpy_helper.from_array(np.array([2], np.int64), "two"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_small_constant_of_shape_becomes_a_constant_and_keeps_the_numbers(tmp_path: Path):
    model = _padded_model("two")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded = load_model(path).model
    ops = [n.op_type for n in loaded.graph]
    assert "ConstantOfShape" not in ops
    zeros = next(n for n in loaded.graph if n.name == "zeros")
    assert zeros.op_type == "Constant"
    assert zeros.attributes["value"].value.numpy().tolist() == [0, 0]
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    legal = ir.serde.serialize_model(loaded)
    np.testing.assert_array_equal(_run(legal, {"x": x})[0], _run(model, {"x": x})[0])


def test_constant_of_shape_of_a_computed_shape_stays(tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save(_padded_model("x_shape"), path)
    assert "ConstantOfShape" in [n.op_type for n in load_model(path).model.graph]


def test_constant_of_shape_over_the_limit_stays(tmp_path: Path):
    nodes = [
        helper.make_node("ConstantOfShape", ["big"], ["zeros"], name="zeros"),
        helper.make_node("Add", ["x", "zeros"], ["y"], name="add"),
    ]
    side = int(np.sqrt(CONSTANT_OF_SHAPE_LIMIT)) + 1
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [side, side])],
        [numpy_helper.from_array(np.array([side, side], np.int64), "big")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert "ConstantOfShape" in [n.op_type for n in load_model(path).model.graph]


def test_unsupported_operators_exit_2_with_one_sorted_line_naming_every_node(tmp_path: Path):
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Zeta", ["a"], ["b"], name="zeta_node", domain="ai.zoo"),
        helper.make_node("Alpha", ["b"], ["c"], name="alpha_node", domain="ai.zoo"),
        helper.make_node("Alpha", ["c"], ["y"], name="alpha_again", domain="ai.zoo"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.zoo", 1)]
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "detc.compiler.cli",
            "compile",
            str(path),
            "--quiet",  # no progress lines: stderr holds the error alone
            "-o",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "ai.zoo" in line
    positions = [line.find(name) for name in ("alpha_again", "alpha_node", "zeta_node")]
    assert -1 not in positions and positions == sorted(positions), line
    assert "relu" not in line
