"""The convolution template with NEON register tiles (block 4 = one 128-bit register of float32):
default tiles that fit the register file, and the code LLVM makes of them for aarch64 (compiled
only; needs no cross compiler, no board)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.kernels.conv2d_nchwc import MAX_OC_TILE, MAX_OH_TILE, register_tiles

tvm = pytest.importorskip("tvm")

NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}


@pytest.mark.parametrize("vectors_per_block", [1, 2, 4])
@pytest.mark.parametrize("accumulators", [8, 16, 24])
@pytest.mark.parametrize(
    ("out_blocks", "out_h", "out_w"),
    [(4, 320, 320), (64, 20, 20), (5, 8, 8), (64, 13, 13), (1, 7, 7), (3, 1, 1)],
)
def test_register_tiles_fit_the_accumulators_and_divide_the_extents(
    out_blocks: int,
    out_h: int,
    out_w: int,
    vectors_per_block: int,
    accumulators: int,
) -> None:
    tiles = register_tiles(
        out_blocks, out_h, out_w, vectors_per_block=vectors_per_block, accumulators=accumulators
    )
    registers = tiles["oc_tile"] * vectors_per_block * tiles["oh_tile"] * tiles["ow_tile"]
    assert registers <= max(accumulators, vectors_per_block)
    assert out_blocks % tiles["oc_tile"] == 0 and tiles["oc_tile"] <= MAX_OC_TILE
    assert out_h % tiles["oh_tile"] == 0 and tiles["oh_tile"] <= MAX_OH_TILE
    assert out_w % tiles["ow_tile"] == 0


def test_register_tiles_of_yolo_widths_use_the_whole_budget() -> None:
    # every map width of a 640-pixel YOLO is a multiple of 4: 4 channel blocks × 4 pixels
    for width in (320, 160, 80, 40, 20):
        assert register_tiles(16, width, width, vectors_per_block=1, accumulators=16) == {
            "oc_tile": 4,
            "oh_tile": 1,
            "ow_tile": 4,
        }
    # a width without a fitting divisor takes rows instead
    assert register_tiles(8, 4, 3, vectors_per_block=1, accumulators=16)["oh_tile"] == 1
    assert register_tiles(1, 8, 7, vectors_per_block=1, accumulators=16) == {
        "oc_tile": 1,
        "oh_tile": 2,
        "ow_tile": 7,
    }


def _template_assembly(tiles: dict[str, int]) -> str:
    from tvm.relax.frontend.onnx import from_onnx

    from detc.kernels.conv2d_int8 import assembly_of
    from detc.kernels.conv2d_nchwc import schedule_conv2d_nchwc
    from detc.targets.tuning.tasks import extract_tasks
    from detc.targets.x86.layout import blocked_layout_passes

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 16, 16])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    target = tvm.target.Target(NEON)
    with target:
        mod = tvm.transform.Sequential(blocked_layout_passes(4))(
            from_onnx(model, keep_params_in_input=False)
        )
    (task,) = [t for t in extract_tasks(mod) if t.templated]
    sch = tvm.s_tir.Schedule(task.workload)
    schedule_conv2d_nchwc(sch, rows_outside=False, inline_pad=False, tiles=tiles)
    return str(assembly_of(tvm.compile(sch.mod, target=target)))


def _count(pattern: str, assembly: str) -> int:
    return len(re.findall(pattern, assembly, flags=re.MULTILINE))


def test_the_neon_micro_kernel_is_fmla_on_whole_registers_without_spills() -> None:
    assembly: Any = _template_assembly({"oc_tile": 4, "oh_tile": 1, "ow_tile": 4})
    fmla = _count(r"^\s*fmla\s+v\d+\.4s", assembly)
    # 4 channel blocks × 4 pixels per input channel: a multiple of 16 fmla, none scalar
    assert fmla >= 16 and fmla % 16 == 0
    assert _count(r"^\s*fmadd\s+s", assembly) == 0
    # the 16 accumulators stay in registers: no q register is reloaded from the stack (the
    # error path stores zeroed q registers there, which is not a spill)
    assert _count(r"^\s*(ldr|ldp)\s+q\d+, (q\d+, )?\[sp", assembly) == 0
