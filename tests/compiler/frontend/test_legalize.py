"""The export idioms real ONNX files carry (issue: real detectors), and refused attributes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler import BadInputError
from detc.compiler.frontend import load_model
from detc.passes import FoldConstantsPass


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _conv_model(rng: np.random.Generator, *, weights_as_inputs: bool) -> onnx.ModelProto:
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if weights_as_inputs:  # what older PyTorch exports and Paddle2ONNX write
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv0", pads=[1, 1, 1, 1])],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_weights_listed_as_inputs_become_constants(tmp_path: Path, rng: np.random.Generator):
    path = _save(_conv_model(rng, weights_as_inputs=True), tmp_path / "m.onnx")
    loaded = load_model(path)
    assert [v.name for v in loaded.model.graph.inputs] == ["x"]
    assert "w" in loaded.model.graph.initializers


def test_weights_as_inputs_import_into_tvm(tmp_path: Path, rng: np.random.Generator):
    pytest.importorskip("tvm")
    from tvm.relax.frontend.onnx import from_onnx

    path = _save(_conv_model(rng, weights_as_inputs=True), tmp_path / "m.onnx")
    from_onnx(ir.serde.serialize_model(load_model(path).model))  # raised before the fix


def _shape_folding_model() -> onnx.ModelProto:
    """y = Reshape(x, Concat(Shape(x)[0], -1)): fold-constants makes an int64 constant of it."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n"], ["n1"], name="unsqueeze", axes=[0]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
        [
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_fold_constants_writes_checker_valid_constants_at_opset_11(tmp_path: Path):
    loaded = load_model(_save(_shape_folding_model(), tmp_path / "m.onnx"))
    result = FoldConstantsPass()(loaded.model)
    assert result.modified
    constants = [n for n in result.model.graph if n.op_type == "Constant"]
    assert constants, "the shape computation should have folded into a Constant"
    for node in constants:
        assert list(node.attributes) == ["value"], node.attributes
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)  # value_ints is invalid at opset 11
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(_ort(proto, {"x": x})[0], x.reshape(2, 12))


def test_constant_value_ints_in_an_input_model_become_tensors(tmp_path: Path):
    nodes = [
        helper.make_node("Constant", [], ["target"], name="c", value_ints=[2, 12]),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    loaded = load_model(_save(model, tmp_path / "m.onnx"))
    constant = next(n for n in loaded.model.graph if n.op_type == "Constant")
    assert list(constant.attributes) == ["value"]
    assert constant.attributes["value"].value.numpy().tolist() == [2, 12]


def _resize_with_empty_scales() -> onnx.ModelProto:
    """PyTorch's opset-11 ``interpolate(size=...)``: roi and scales empty, sizes given."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "Resize", ["x", "roi", "scales", "sizes"], ["y"], name="up", mode="nearest"
            )
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        [
            numpy_helper.from_array(np.zeros(0, dtype=np.float32), "roi"),
            numpy_helper.from_array(np.zeros(0, dtype=np.float32), "scales"),
            numpy_helper.from_array(np.array([1, 2, 8, 8], dtype=np.int64), "sizes"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def test_empty_resize_scales_are_absent(tmp_path: Path, rng: np.random.Generator):
    model = _resize_with_empty_scales()
    loaded = load_model(_save(model, tmp_path / "m.onnx"))
    resize = next(n for n in loaded.model.graph if n.op_type == "Resize")
    assert resize.inputs[1] is None and resize.inputs[2] is None
    assert resize.inputs[3] is not None
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    legal = ir.serde.serialize_model(loaded.model)
    np.testing.assert_array_equal(_ort(legal, {"x": x})[0], _ort(model, {"x": x})[0])


def test_empty_resize_scales_import_into_tvm(tmp_path: Path):
    pytest.importorskip("tvm")
    from tvm.relax.frontend.onnx import from_onnx

    loaded = load_model(_save(_resize_with_empty_scales(), tmp_path / "m.onnx"))
    from_onnx(ir.serde.serialize_model(loaded.model))  # "Only one of scales and sizes" before


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("dilations", [-1, -1]),
        ("dilations", [-1000, 1]),
        ("pads", [-1, 0, 0, 0]),
        ("strides", [0, 1]),
    ],
)
def test_negative_window_attributes_are_refused_naming_the_node(
    tmp_path: Path, rng: np.random.Generator, attribute: str, value: list[int]
):
    model = _conv_model(rng, weights_as_inputs=False)
    conv = model.graph.node[0]
    for attr in list(conv.attribute):
        if attr.name == attribute:
            conv.attribute.remove(attr)
    conv.attribute.append(helper.make_attribute(attribute, value))
    path = _save(model, tmp_path / "m.onnx")
    with pytest.raises(BadInputError, match=rf"node 'conv0' \(Conv\) has {attribute}="):
        load_model(path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "detc.compiler.cli",
            "compile",
            str(path),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "conv0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_input_shape_may_change_a_fixed_size_the_graph_follows(
    tmp_path: Path, rng: np.random.Generator
):
    model = _conv_model(rng, weights_as_inputs=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 10
    loaded = load_model(_save(model, tmp_path / "m.onnx"), input_shapes={"x": (1, 3, 32, 32)})
    assert list(loaded.model.graph.outputs[0].shape) == [1, 4, 32, 32]


def test_input_shape_the_graph_does_not_follow_names_the_node(tmp_path: Path):
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "target"], ["y"], name="head_reshape")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 12])],
        [numpy_helper.from_array(np.array([10, 12], dtype=np.int64), "target")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _save(model, tmp_path / "m.onnx")
    with pytest.raises(BadInputError, match=r"'head_reshape' \(Reshape\).*do not follow"):
        load_model(path, input_shapes={"x": (1, 3, 4)})
