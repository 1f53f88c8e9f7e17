"""The blocked layout passes: a YOLO neck's upsample + concat stays in blocks, and the built
model still computes what onnxruntime does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from detc.compiler.reference import ort_session, run_session
from detc.targets import load_artifact
from detc.targets.artifact import build_artifact
from detc.targets.x86.layout import bind_weights_as_constants, keep_resize_and_concat_blocked


def _neck(resize_mode: str) -> onnx.ModelProto:
    """conv → 2× upsample, concatenated with a conv of the finer map, then a 3×3 conv."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.1, shape).astype(np.float32), name)

    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),
        helper.make_node("Resize", ["a", "", "scales"], ["up"], mode=resize_mode),
        helper.make_node("Conv", ["y", "w2"], ["b"]),
        helper.make_node("Concat", ["up", "b"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["out"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "neck",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 32, 16, 16])],
        [
            weight("w1", (32, 16, 1, 1)),
            weight("w2", (32, 16, 1, 1)),
            weight("w3", (32, 64, 3, 3)),
            scales,
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _after_convert_layout(model: onnx.ModelProto, block: int) -> tvm.IRModule:
    mod = from_onnx(model, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    mod = bind_weights_as_constants(mod, [p.numpy() for p in params["main"]], 2)
    layouts = [f"NCHW{block}c", f"OIHW{block}i{block}o"]
    passes = [
        relax.transform.ConvertLayout({"relax.nn.conv2d": layouts}),
        keep_resize_and_concat_blocked(block),
    ]
    return tvm.transform.Sequential(passes)(mod)


def _ops(mod: tvm.IRModule) -> list[relax.Call]:
    calls: list[relax.Call] = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None
    )
    return calls


@pytest.mark.parametrize("block", [16, 4])
def test_upsample_and_concat_stay_in_blocks(block: int) -> None:
    calls = _ops(_after_convert_layout(_neck("nearest"), block))
    resizes = [c for c in calls if c.op.name == "relax.image.resize2d"]
    concats = [c for c in calls if c.op.name == "relax.concat"]
    assert [r.attrs.layout for r in resizes] == [f"NCHW{block}c"]
    assert len(concats) == 1 and int(concats[0].ty.ndim) == 5
    # the only conversions left: the graph inputs into blocks, the output out of them
    conversions = [c for c in calls if c.op.name == "relax.layout_transform"]
    inputs = [c for c in conversions if isinstance(c.args[0], relax.Var)]
    inputs = [c for c in inputs if c.args[0].name in ("x", "y")]
    unblocks = [c for c in conversions if int(c.ty.ndim) == 4]
    assert len(inputs) == 2 and len(unblocks) == 1


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_the_blocked_neck_computes_what_onnxruntime_does(tmp_path: Path, mode: str) -> None:
    model = _neck(mode)
    build_artifact(
        model, "x86", tmp_path / "neck", manifest_fields={}, progress=False, report=lambda _m: None
    )
    rng = np.random.default_rng(1)
    feeds = {
        "x": rng.random((1, 16, 8, 8), dtype=np.float32),
        "y": rng.random((1, 16, 16, 16), dtype=np.float32),
    }
    expected = run_session(ort_session(model), feeds)["out"]
    actual = load_artifact(tmp_path / "neck")(**feeds)["out"]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
