"""The blocked-layout passes around a convolution whose output channels are not whole blocks
(YOLO's 255-channel heads): bias and activation stay in the convolution's blocked epilogue, the
conversion back to NCHW is fused with the data movement after it, and the numbers still match
onnxruntime."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.tolerances import FP32_EXACT

tvm = pytest.importorskip("tvm")

BLOCK = 16
TARGET = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}


def head_model(rng: np.random.Generator, out_channels: int = 20) -> onnx.ModelProto:
    """1×1 conv with bias → Reshape → Transpose → Sigmoid, like one YOLOv5 detection head
    (2 anchors × 10 values here instead of 3 × 85)."""
    weight = (rng.standard_normal((out_channels, BLOCK, 1, 1)) * 0.3).astype(np.float32)
    bias = (rng.standard_normal(out_channels) * 0.2).astype(np.float32)
    shape = np.array([1, 2, out_channels // 2, 6, 6], dtype=np.int64)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="head"),
        helper.make_node("Reshape", ["conv", "shape"], ["split"], name="reshape"),
        helper.make_node("Transpose", ["split"], ["moved"], perm=[0, 1, 3, 4, 2], name="move"),
        helper.make_node("Sigmoid", ["moved"], ["y"], name="act"),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, BLOCK, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(shape, "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def blocked_module(model: onnx.ModelProto) -> Any:
    from tvm.relax.frontend.onnx import from_onnx

    from detc.targets.x86.layout import blocked_layout_passes, hoist_activations

    mod = from_onnx(model, keep_params_in_input=False)
    with tvm.target.Target(TARGET):
        mod = hoist_activations()(mod)
        return tvm.transform.Sequential(blocked_layout_passes(BLOCK))(mod)


def prim_func_names(mod: Any) -> list[str]:
    return sorted(
        gvar.name_hint
        for gvar, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
    )


def test_bias_and_activation_stay_in_the_blocked_epilogue_of_a_padded_head() -> None:
    names = prim_func_names(blocked_module(head_model(np.random.default_rng(0))))
    convs = [n for n in names if "conv2d" in n]
    assert len(convs) == 1
    assert "add" in convs[0] and "sigmoid" in convs[0], names
    # the conversion out of blocks is not in the convolution: it moves data with the rest
    assert "unblock" not in convs[0] and "layout_transform" not in convs[0], names
    movers = [n for n in names if "unblock" in n]
    assert len(movers) == 1 and "strided_slice" in movers[0] and "transpose" in movers[0], names


def test_padded_head_matches_onnxruntime() -> None:
    from tvm import relax

    rng = np.random.default_rng(1)
    model = head_model(rng)
    x = rng.standard_normal((1, BLOCK, 6, 6)).astype(np.float32)
    expected = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    mod = blocked_module(model)
    executable = tvm.compile(mod, target=tvm.target.Target(TARGET))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=FP32_EXACT.rtol, atol=FP32_EXACT.atol)


def residual_from_int8_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A float conv whose residual Add reads a dequantized int8 tensor: what a mixed-precision
    graph has where an int8 layer feeds a layer kept in float."""
    weight = (rng.standard_normal((BLOCK, BLOCK, 3, 3)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quantize"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["d"], name="dequantize"),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "d"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, BLOCK, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_template_schedules_a_conv_whose_epilogue_reads_a_dequantized_tensor() -> None:
    """The epilogue moves under the convolution's tile loop; a producer only it reads (the
    dequantize) must move with it, in every structural variant of the template."""
    from detc.kernels.conv2d_nchwc import VARIANTS, has_conv2d_nchwc, schedule_conv2d_nchwc

    mod = blocked_module(residual_from_int8_model(np.random.default_rng(0)))
    convs = [
        func
        for _, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc) and has_conv2d_nchwc(func)
    ]
    assert len(convs) == 1
    whole = tvm.s_tir.Schedule(convs[0])
    names = [whole.get(b).name_hint for b in whole.get_child_blocks(whole.get_sblock("root"))]
    assert any("dequantize" in n for n in names), names  # fused into the conv's function
    for rows_outside, inline_pad in VARIANTS:
        sch = tvm.s_tir.Schedule(convs[0])
        schedule_conv2d_nchwc(sch, rows_outside=rows_outside, inline_pad=inline_pad)
        tvm.compile(
            tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}),
            target=tvm.target.Target(TARGET),
        )


def narrow_chain_model(rng: np.random.Generator) -> onnx.ModelProto:
    """RGB → 8 channels → 24 channels: neither convolution has whole-block inputs or outputs
    (what a prune with multiple=8 leaves)."""
    first = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    second = (rng.standard_normal((24, 8, 3, 3)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["a1"], name="act"),
        helper.make_node("Conv", ["a1", "w2"], ["y"], name="second", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "narrow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_convs_without_whole_blocks_get_the_blocked_kernel_and_match_onnxruntime() -> None:
    """TVM's generic NCHW conv2d took 50 ms for yolov5n's first layer cut to 8 channels (25x
    the blocked kernel): channels that are not whole blocks are padded into the template too."""
    from tvm import relax

    rng = np.random.default_rng(2)
    model = narrow_chain_model(rng)
    mod = blocked_module(model)
    convs = [
        func
        for gvar, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc) and "conv2d" in gvar.name_hint
    ]
    assert len(convs) == 2
    dim = r"(?:T\.int64\(\d+\)|\d+)"
    six_dims = re.compile(rf"T\.Buffer\(\({dim}(?:, {dim}){{5}}\)")
    for func in convs:  # the template reads a packed kernel: (O/16, I/b, KH, KW, b, 16)
        assert six_dims.search(func.script()), func.script()[:600]
    x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
    expected = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    executable = tvm.compile(mod, target=tvm.target.Target(TARGET))
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=FP32_EXACT.rtol, atol=FP32_EXACT.atol)
