"""Direct 2-D convolution in the blocked NCHW[x]c layout, and its MetaSchedule template.

Layouts (``b`` = channel block, the fp32 lanes of one vector register: 16 for AVX-512, 8 for AVX2)::

    data    [N, IC/b, H, W, b]            (NCHW{b}c)   or plain NCHW for a first layer (IC % b != 0)
    kernel  [OC/b, IC/b, KH, KW, b, b]    (OIHW{b}i{b}o; IC/b = IC, inner 1 for NCHW data)
    output  [N, OC/b, OH, OW, b]          (NCHW{b}c)

The micro-kernel keeps an ``oc_tile × oh_tile × ow_tile`` block of output vectors in registers:
for every input channel, kernel row and column it loads one weight vector per output-channel
block and broadcasts one input value per output pixel (an FMA with an embedded broadcast on
AVX-512). The tile sizes, the loop order of the parallel part and whether the zero padding is
materialised or folded into the loads are the *knobs*; :func:`schedule_conv2d_nchwc` samples them
with MetaSchedule instructions, so the evolutionary search mutates exactly these decisions.

The epilogue that FuseOps attached to the convolution (bias, activation, residual add, layout
transform back to NCHW) is inlined into one block that runs on the register tile right after it
is complete, so every output element is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tvm
from tvm import te, tirx

#: block annotation that marks the convolution of this template in a (fused) PrimFunc
CONV_MARK = "detc.conv2d_nchwc"
#: largest output tile along W (pixels) and along output-channel blocks the search may pick
MAX_OW_TILE = 32
MAX_OC_TILE = 4
MAX_OH_TILE = 4


def conv2d_nchwc(
    data: te.Tensor,
    kernel: te.Tensor,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_dtype: str | None = None,
) -> te.Tensor:
    """``data`` NCHW{b}c (5-D) or NCHW (4-D), ``kernel`` OIHW{bi}i{b}o → output NCHW{b}c.

    ``padding`` is (top, left, bottom, right). The zero padding is a separate ``pad_temp`` stage
    that the schedule may inline.
    """
    blocked_input = len(data.shape) == 5
    if blocked_input:
        batch, in_blocks, height, width, in_block = (int(d) for d in data.shape)
    else:
        batch, in_blocks, height, width = (int(d) for d in data.shape)
        in_block = 1
    out_blocks, kernel_in_blocks, kernel_h, kernel_w, kernel_in_block, out_block = (
        int(d) for d in kernel.shape
    )
    if (kernel_in_blocks, kernel_in_block) != (in_blocks, in_block):
        raise ValueError(
            f"kernel {list(kernel.shape)} does not match data {list(data.shape)} (groups != 1?)"
        )
    stride_h, stride_w = (int(s) for s in strides)
    dilation_h, dilation_w = (int(d) for d in dilation)
    pad_top, pad_left, pad_bottom, pad_right = (int(p) for p in padding)
    out_h = (height + pad_top + pad_bottom - (kernel_h - 1) * dilation_h - 1) // stride_h + 1
    out_w = (width + pad_left + pad_right - (kernel_w - 1) * dilation_w - 1) // stride_w + 1
    dtype = out_dtype or data.dtype

    def read(n: Any, cb: Any, h: Any, w: Any, c: Any) -> Any:
        return data[n, cb, h, w, c] if blocked_input else data[n, cb, h, w]

    if pad_top or pad_left or pad_bottom or pad_right:
        padded_shape = (
            batch,
            in_blocks,
            height + pad_top + pad_bottom,
            width + pad_left + pad_right,
        )
        zero = tirx.const(0.0, data.dtype)

        def padded(n: Any, cb: Any, h: Any, w: Any, c: Any) -> Any:
            inside = tirx.all(
                h >= pad_top, h < height + pad_top, w >= pad_left, w < width + pad_left
            )
            return tirx.if_then_else(inside, read(n, cb, h - pad_top, w - pad_left, c), zero)

        source = te.compute((*padded_shape, in_block), padded, name="pad_temp")

        def load(n: Any, cb: Any, h: Any, w: Any, c: Any) -> Any:
            return source[n, cb, h, w, c]
    else:
        load = read

    ic_block = te.reduce_axis((0, in_blocks), name="ic_block")
    kh = te.reduce_axis((0, kernel_h), name="kh")
    kw = te.reduce_axis((0, kernel_w), name="kw")
    ic_inner = te.reduce_axis((0, in_block), name="ic_inner")

    def body(n: Any, ob: Any, oh: Any, ow: Any, oc: Any) -> Any:
        pixel = load(
            n, ic_block, oh * stride_h + kh * dilation_h, ow * stride_w + kw * dilation_w, ic_inner
        )
        weight = kernel[ob, ic_block, kh, kw, ic_inner, oc]
        return te.sum(pixel.astype(dtype) * weight.astype(dtype), axis=[ic_block, kh, kw, ic_inner])

    return te.compute(
        (batch, out_blocks, out_h, out_w, out_block),
        body,
        name="conv2d_nchwc",
        attrs={CONV_MARK: 1},
    )


def blocked_to_nchw(tensor: te.Tensor, channels: int) -> te.Tensor:
    """NCHW{b}c → NCHW with ``channels`` channels (drops the zero padding of the last block)."""
    batch, _, height, width, block = (int(d) for d in tensor.shape)
    return te.compute(
        (batch, channels, height, width),
        lambda n, c, h, w: tensor[n, c // block, h, w, c % block],
        name="to_nchw",
    )


def pack_kernel(weight: np.ndarray, in_block: int, out_block: int) -> np.ndarray:
    """OIHW → OIHW{in_block}i{out_block}o (output channels zero-padded to a whole block)."""
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    if in_channels % in_block:
        raise ValueError(f"{in_channels} input channels are not a multiple of {in_block}")
    padded = -(-out_channels // out_block) * out_block
    if padded != out_channels:
        extra = np.zeros((padded - out_channels, *weight.shape[1:]), dtype=weight.dtype)
        weight = np.concatenate([weight, extra])
    blocked = weight.reshape(
        padded // out_block, out_block, in_channels // in_block, in_block, kernel_h, kernel_w
    )
    return np.ascontiguousarray(blocked.transpose(0, 2, 4, 5, 3, 1))


# ---- the schedule template -------------------------------------------------------------------


def find_conv_block(sch: tvm.s_tir.Schedule) -> Any | None:
    """The block of :func:`conv2d_nchwc` in ``sch``'s function, or None."""
    for block in _all_blocks(sch):
        if CONV_MARK in sch.get(block).annotations:
            return block
    return None


def _all_blocks(sch: tvm.s_tir.Schedule) -> list[Any]:
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))


def has_conv2d_nchwc(func: tvm.tirx.PrimFunc) -> bool:
    """Whether ``func`` holds a convolution this template schedules."""
    sch = tvm.s_tir.Schedule(func)
    return find_conv_block(sch) is not None


#: the structural variants of the template: (rows outside channel blocks, padding inlined)
VARIANTS: tuple[tuple[bool, bool], ...] = (
    (False, False),
    (True, False),
    (False, True),
    (True, True),
)


def schedule_conv2d_nchwc(
    sch: tvm.s_tir.Schedule,
    *,
    rows_outside: bool,
    inline_pad: bool,
    tiles: dict[str, int] | None = None,
) -> tvm.s_tir.Schedule:
    """Schedule the (fused) convolution function in ``sch`` in place; returns ``sch``.

    ``rows_outside`` puts output rows outside output-channel blocks in the parallel loop;
    ``inline_pad`` folds the zero padding into the loads instead of materialising it. These two
    change the loop structure, so each pair is its own design space (:data:`VARIANTS`): the
    search mutates *sampled* decisions only. Without ``tiles`` the tile sizes (``oc_tile``,
    ``oh_tile``, ``ow_tile``) are sampled; ``tiles`` fixes them (a build without search).
    """
    conv = find_conv_block(sch)
    if conv is None:
        raise ValueError("no conv2d_nchwc block in this function")
    blocks = _all_blocks(sch)
    conv_name = sch.get(conv).name_hint
    position = [sch.get(b).name_hint for b in blocks].index(conv_name)
    producers = blocks[:position]
    consumers = blocks[position + 1 :]

    # Epilogue: everything after the convolution collapses into its last block. What only the
    # epilogue reads (a dequantized residual of an int8 graph) is inlined into it first: the
    # epilogue moves under the convolution's tile loop, and its producers must come along.
    conv_reads = {sch.get(b).name_hint for b in sch.get_producers(conv)}
    side_inputs = [
        b
        for b in producers
        if sch.get(b).name_hint not in conv_reads
        and not sch.get(b).name_hint.startswith("pad_temp")
    ]
    producers = [b for b in producers if b not in side_inputs]
    for block in side_inputs:
        sch.compute_inline(block)
    for block in consumers[:-1]:
        sch.compute_inline(block)
    epilogue = consumers[-1] if consumers else None

    sch.annotate(conv, "detc.rows_outside", int(rows_outside))
    sch.annotate(conv, "detc.inline_pad", int(inline_pad))
    n, out_blocks, oh, ow, oc, ic_block, kh, kw, ic_inner = sch.get_loops(conv)
    oc_outer, oc_tile = _split(sch, conv, out_blocks, MAX_OC_TILE, tiles, "oc_tile")
    oh_outer, oh_tile = _split(sch, conv, oh, MAX_OH_TILE, tiles, "oh_tile")
    ow_outer, ow_tile = _split(sch, conv, ow, MAX_OW_TILE, tiles, "ow_tile")
    outer = (oh_outer, oc_outer) if rows_outside else (oc_outer, oh_outer)
    sch.reorder(n, *outer, ow_outer, ic_block, kh, kw, ic_inner, oc_tile, oh_tile, ow_tile, oc)
    sch.parallel(sch.fuse(n, *outer))

    # preserve_unit_loops: the loop count below must not depend on the sampled tiles, or a
    # mutated trace no longer replays (get_loops would return a different number of loops).
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, ow_outer, preserve_unit_loops=True)
        sch.set_scope(conv, 0, "local")
        sch.vectorize(sch.get_loops(epilogue)[-1])
    else:
        writer = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(writer, ow_outer, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(writer)[-1])

    sch.vectorize(oc)
    for loop in (oc_tile, oh_tile, ow_tile):
        sch.unroll(loop)
    sch.decompose_reduction(conv, ic_block)

    for block in producers:
        if sch.get(block).name_hint.startswith("pad_temp") and not inline_pad:
            loops = sch.get_loops(block)
            sch.parallel(sch.fuse(*loops[:3]))
            sch.vectorize(loops[-1])
        else:
            sch.compute_inline(block)
    return sch


def _split(
    sch: tvm.s_tir.Schedule,
    conv: Any,
    loop: Any,
    max_inner: int,
    tiles: dict[str, int] | None,
    name: str,
) -> tuple[Any, Any]:
    """Split ``loop`` by a sampled tile (``tiles[name]`` fixes the decision: the largest divisor
    of the extent not above it), recorded on the block as ``detc.<name>`` for transfer."""
    decision = None
    if tiles is not None:
        extent = int(sch.get(loop).extent)
        inner = largest_divisor_at_most(extent, min(int(tiles.get(name, 1)), max_inner))
        decision = [extent // inner, inner]
    factors = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max_inner, decision=decision)
    sch.annotate(conv, f"detc.{name}", factors[1])
    outer, inner_loop = sch.split(loop, factors)
    return outer, inner_loop


def knobs_of(func: tvm.tirx.PrimFunc) -> dict[str, int] | None:
    """The knobs a scheduled function was built with (None when it is not this template's)."""
    sch = tvm.s_tir.Schedule(func)
    for block in _all_blocks(sch):
        annotations = sch.get(block).annotations
        if CONV_MARK in annotations and "detc.ow_tile" in annotations:
            keys = ("oc_tile", "oh_tile", "ow_tile", "rows_outside", "inline_pad")
            return {k: int(annotations[f"detc.{k}"]) for k in keys if f"detc.{k}" in annotations}
    return None


def largest_divisor_at_most(value: int, bound: int) -> int:
    return max(d for d in range(1, max(1, bound) + 1) if value % d == 0)


def default_tiles(out_blocks: int, out_w: int) -> dict[str, int]:
    """Tiles that were good across the convolutions of YOLO-style detectors on AVX-512:
    ~20 accumulator registers, two output-channel blocks by up to ten pixels."""
    oc_tile = 2 if out_blocks % 2 == 0 else 1
    ow_tile = largest_divisor_at_most(out_w, 10 if oc_tile == 2 else 20)
    return {"oc_tile": oc_tile, "oh_tile": 1, "ow_tile": ow_tile}


def square_tiles(out_blocks: int, out_w: int) -> dict[str, int]:
    """The other shape the search often ends at: four channel blocks × two rows × two pixels
    (16 accumulators; each loaded input value feeds four FMAs, each weight vector four)."""
    oc_tile = largest_divisor_at_most(out_blocks, 4)
    return {
        "oc_tile": oc_tile,
        "oh_tile": 2,
        "ow_tile": largest_divisor_at_most(out_w, 8 // oc_tile),
    }


def register_tiles(
    out_blocks: int, out_h: int, out_w: int, *, vectors_per_block: int, accumulators: int
) -> dict[str, int]:
    """Default tiles for a CPU whose output-channel block spans ``vectors_per_block`` vector
    registers and which can keep ``accumulators`` of them as accumulators (NEON: 32 registers,
    a few left for the weight vectors and the input values they multiply).

    As many output-channel blocks as leave room for two pixels (each loaded weight vector then
    feeds ``oh_tile × ow_tile`` FMAs), then as many pixels along W as the remaining accumulators
    hold (each loaded input value feeds ``oc_tile × vectors_per_block`` FMAs), then rows where
    the width has no fitting divisor (a 13-pixel map would otherwise get a one-pixel tile)."""
    per_pixel_cap = max(1, accumulators // (2 * vectors_per_block))
    oc_tile = largest_divisor_at_most(out_blocks, min(MAX_OC_TILE, per_pixel_cap))
    pixels = max(1, accumulators // (oc_tile * vectors_per_block))
    ow_tile = largest_divisor_at_most(out_w, min(MAX_OW_TILE, pixels))
    oh_tile = largest_divisor_at_most(out_h, min(MAX_OH_TILE, pixels // ow_tile))
    return {"oc_tile": oc_tile, "oh_tile": oh_tile, "ow_tile": ow_tile}
