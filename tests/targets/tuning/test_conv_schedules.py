"""Which schedule each convolution kernel got, as a build states it: the template with its
tiles, or TVM's generic loop nest; and the multiply-accumulates each one does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.targets.tuning.conv_schedules import (
    GENERIC,
    TEMPLATE,
    ConvKernel,
    conv_kernels,
    summary_line,
)

tvm = pytest.importorskip("tvm")

NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}


def dense_then_depthwise(rng: np.random.Generator) -> onnx.ModelProto:
    """16 → 32 channels 3×3 at 16×16 (a template conv), then a depthwise 3×3 (generic)."""
    dense = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    depthwise = rng.standard_normal((32, 1, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="dense"),
        helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1], group=32, name="dw"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 16, 16])],
        [numpy_helper.from_array(dense, "w1"), numpy_helper.from_array(depthwise, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_template_and_generic_kernels_are_told_apart_with_their_macs() -> None:
    from tvm.relax.frontend.onnx import from_onnx

    from detc.kernels.conv2d_nchwc import register_tiles
    from detc.targets.tuning.tasks import apply_schedules, extract_tasks
    from detc.targets.x86.layout import blocked_layout_passes

    target = tvm.target.Target(NEON)
    with target:
        mod = tvm.transform.Sequential(blocked_layout_passes(4))(
            from_onnx(dense_then_depthwise(np.random.default_rng(5)), keep_params_in_input=False)
        )

    def neon_tiles(out_blocks: int, out_h: int, out_w: int) -> dict[str, int]:
        return register_tiles(out_blocks, out_h, out_w, vectors_per_block=1, accumulators=16)

    scheduled, counts = apply_schedules(mod, extract_tasks(mod), None, target, neon_tiles)
    assert counts["template_default"] == 1
    kernels = conv_kernels(scheduled)
    by_schedule = {k.schedule: k for k in kernels}
    assert sorted(by_schedule) == [GENERIC, TEMPLATE]
    template, generic = by_schedule[TEMPLATE], by_schedule[GENERIC]
    assert template.macs == 32 * 16 * 9 * 16 * 16
    assert template.tiles is not None
    assert {k: template.tiles[k] for k in ("oc_tile", "oh_tile", "ow_tile")} == {
        "oc_tile": 4,
        "oh_tile": 1,
        "ow_tile": 4,
    }
    assert generic.macs == 32 * 9 * 16 * 16 and generic.tiles is None
    assert template.calls == generic.calls == 1
    assert template.describe().startswith(f"conv kernel {template.name}: template (")
    assert "generic (TVM's default loop nest)" in generic.describe()
    line = summary_line(kernels, "NEON blocked template")
    assert line.startswith("convolutions: 1 of 2 kernels (2 calls) use the NEON blocked template")
    assert f"not: {generic.name} (generic)" in line


def test_the_manifest_form_keeps_tiles_only_for_the_template() -> None:
    template = ConvKernel("fused_conv2d", TEMPLATE, 100, 3, {"oc_tile": 4})
    generic = ConvKernel("fused_conv2d1", GENERIC, 50, 1, None)
    assert template.as_manifest() == {
        "name": "fused_conv2d",
        "schedule": "template",
        "macs": 100,
        "calls": 3,
        "tiles": {"oc_tile": 4},
    }
    assert "tiles" not in generic.as_manifest()
    assert "× 3 calls" in template.describe() and "calls" not in generic.describe()
