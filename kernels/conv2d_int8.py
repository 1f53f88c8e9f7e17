"""Quantized 2-D convolution for x86: 8-bit × int8 → int32, requantized in the same function.

The function computes what onnxruntime's ``QLinearConv`` computes (MLAS), bit for bit::

    acc[c] = Σ (x - x_zp) · w[c] + bias_q[c]                          (int32, exact)
    y[c]   = saturate(round_half_even(float(acc[c]) · m[c]) + y_zp)
    m[c]   = x_scale · w_scale[c] / y_scale                           (float32)

``m`` is computed in float32 in that order, ``float(acc)`` rounds like ``cvtdq2ps``, the product
is one float32 multiply (no FMA can form: nothing is added after it in float) and the rounding is
half to even, like ``cvtps2dq`` under the default MXCSR mode
(:func:`~detc.kernels.int8_compute.quantized_output`).

Since ``Σ (x - x_zp)·w = Σ x·w - x_zp·Σ w``, the kernel multiplies the raw 8-bit values and folds
``-x_zp·Σ w[c]`` into the bias at compile time; zero padding becomes padding with ``x_zp``.
Weight zero points must be 0 (symmetric weights, what onnxruntime's quantizer produces).

Layouts (``L`` = int32 lanes of the accumulator vector: 16 with AVX-512, 8 with AVX2)::

    data     [N, C, H, W]                 uint8 or int8 (int8 is shifted by +128 on packing)
    packed   [N, C/4, H', W', 4]          uint8: four input channels per 32-bit word, padded
    kernel   [OC/L, C/4, KH, KW, L, 4]    int8  (:func:`~detc.kernels.int8_geometry.pack_weight`)
    acc      [N, OC/L, OH, OW', L]        int32, a register tile
    output   [N, OC, OH, OW]              uint8 or int8

That is the *channel* layout. The *pixel* layout (stride 1 along the width, VNNI only) swaps
the roles: a vector is ``L`` neighbouring output pixels of one channel, one ``vpdpbusd`` takes
``L`` packed pixels (one contiguous 64-byte load) times one channel's four weight bytes
(broadcast), the weights are packed ``[OC/t, C/4, KH, KW, t, 4]`` for a tile of ``t`` channels,
and the accumulator ``[N, OC', OH, OW']`` is NCHW already: the epilogue stores whole pixel vectors
instead of transposing 16-channel vectors byte by byte. A 1×1 convolution with stride 1 and no
padding runs on the image as one row of ``H·W`` pixels. Which layout and tile is fastest depends
on the workload: :mod:`detc.kernels.int8_tiles` measures it, :mod:`detc.targets.tuning.tiles`
remembers it.

Temporaries of a tile are in the default ("global") scope, and the searched pixel tiles stay
under 1 KiB: TVM serves a ``local`` buffer, or any buffer of 1 KiB or more, inside a parallel loop
with a ``TVMBackendAllocWorkspace`` call per tile (heap memory the accumulator then lives in)
instead of the stack, where LLVM keeps it in registers. (The channel layout's default 2 × 10 tile
is 1.25 KiB and still takes the heap path; measured, it was no slower than 2 × 7.)

One step of the reduction is one ``vpdpbusd``: the four bytes of one pixel (broadcast) times the
``L × 4`` weight bytes of ``L`` output channels, added into ``L`` int32 lanes. With AVX512-VNNI
(or AVX-VNNI for ``L = 8``) the schedule tensorizes that step with the LLVM intrinsic; without
VNNI the same loop nest is left to LLVM's vectoriser (exact, slower).

This module is the kernel's entry point (:func:`build_conv2d_int8`); the pieces live beside it:
:mod:`~detc.kernels.int8_geometry` (the convolution's constants, ISA, tiles and layouts, numpy
only), :mod:`~detc.kernels.int8_compute` (pack, int32 sum and output stage as tensor
expressions), :mod:`~detc.kernels.int8_intrinsics` (the ``vpdpbusd`` steps) and
:mod:`~detc.kernels.int8_schedules` (the register-tiled schedules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import te

from detc.kernels.int8_compute import conv2d_int8_compute
from detc.kernels.int8_geometry import (
    CHANNELS,
    PIXELS,
    Geometry,
    Int8Isa,
    QuantizedConv2d,
    Tiles,
    default_tiles,
    flattens_pixels,
    int8_isa,
    pack_weight,
    pad_channels,
    pixel_layout_applies,
    plan_geometry,
)
from detc.kernels.int8_schedules import schedule_conv2d_int8_channels, schedule_conv2d_int8_pixels

# What callers (the int8 lowering, the tile search, tests) use of the kernel, importable from
# its entry point wherever the piece lives.
__all__ = [
    "CHANNELS",
    "OPAQUE_PATTERN",
    "PIXELS",
    "Geometry",
    "Int8Isa",
    "Int8Kernel",
    "QuantizedConv2d",
    "Tiles",
    "assembly_of",
    "build_conv2d_int8",
    "default_tiles",
    "flattens_pixels",
    "int8_isa",
    "pack_weight",
    "pixel_layout_applies",
    "plan_geometry",
]


#: TVM's OpPatternKind for functions FuseOps must leave alone
OPAQUE_PATTERN = 8


@dataclass(frozen=True)
class Int8Kernel:
    """A scheduled PrimFunc and the constants it takes after the data (in order)."""

    func: tvm.tirx.PrimFunc
    #: packed kernel, folded int32 bias, requant multiplier[, float bias]
    constants: tuple[np.ndarray, ...]
    out_shape: tuple[int, int, int, int]
    out_dtype: str
    isa: Int8Isa
    #: the data and output shapes ``func`` takes when they differ from the graph's (a 1×1
    #: convolution in the pixel layout runs on ``[N, C, 1, H·W]``: the caller reshapes, which
    #: costs nothing); None when ``func`` takes the graph's shapes
    func_data_shape: tuple[int, ...] | None = None
    func_out_shape: tuple[int, ...] | None = None


def build_conv2d_int8(
    data_shape: tuple[int, ...],
    conv: QuantizedConv2d,
    target: tvm.target.Target,
    tiles: Tiles | None = None,
) -> Int8Kernel:
    """The scheduled function ``(data, *constants) -> output`` for ``target``.

    Marked ``tirx.is_scheduled`` (the tuner leaves it alone) and opaque to FuseOps (fusing
    would merge its scheduled body into an unscheduled one). ``tiles`` picks the accumulator
    layout and register tile (:data:`Tiles`; default :func:`default_tiles`). Every choice
    computes the same integers and the same float operations per output: results are
    identical bit for bit, only the speed differs.
    """
    isa = int8_isa(target)
    graph_shape = tuple(int(d) for d in data_shape)
    chosen = dict(tiles) if tiles is not None else default_tiles(graph_shape, conv, isa)
    pixels = chosen.get("layout") == PIXELS
    func_shape = graph_shape
    if pixels and flattens_pixels(conv):
        batch, channels, height, width = graph_shape
        func_shape = (batch, channels, 1, height * width)
    geometry = plan_geometry(func_shape, conv, isa, chosen)
    channel_multiple = geometry.oc_tile if pixels else isa.lanes
    packed_weight = pack_weight(conv.weight, channel_multiple)
    bias = pad_channels(conv.folded_bias(), channel_multiple)
    multiplier = pad_channels(conv.kernel_multiplier(), channel_multiple)
    constants = [packed_weight, bias, multiplier]
    data = te.placeholder(func_shape, conv.input_dtype, name="data")
    kernel = te.placeholder(packed_weight.shape, "int8", name="kernel")
    bias_t = te.placeholder(bias.shape, "int32", name="bias")
    multiplier_t = te.placeholder(multiplier.shape, "float32", name="multiplier")
    inputs = [data, kernel, bias_t, multiplier_t]
    float_bias_t = None
    if conv.float_bias is not None:
        if not conv.float_output:
            raise ValueError("a float bias needs a float32 output (quantize it for 8-bit)")
        constants.append(pad_channels(conv.float_bias.astype(np.float32), channel_multiple))
        float_bias_t = te.placeholder(constants[-1].shape, "float32", name="float_bias")
        inputs.append(float_bias_t)
    out = conv2d_int8_compute(
        data, kernel, bias_t, multiplier_t, float_bias_t, conv, geometry, isa.lanes
    )
    func = te.create_prim_func([*inputs, out])
    if pixels:
        func = schedule_conv2d_int8_pixels(func, isa, geometry)
    else:
        func = schedule_conv2d_int8_channels(func, isa, geometry)
    func = (
        func.without_attr("global_symbol")
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
    )
    func_out_shape = (geometry.batch, geometry.out_channels, geometry.out_h, geometry.out_w)
    if func_shape == graph_shape:
        return Int8Kernel(func, tuple(constants), func_out_shape, conv.output_dtype, isa)
    batch, _, height, width = graph_shape
    return Int8Kernel(
        func=func,
        constants=tuple(constants),
        out_shape=(batch, geometry.out_channels, height, width),
        out_dtype=conv.output_dtype,
        isa=isa,
        func_data_shape=func_shape,
        func_out_shape=func_out_shape,
    )


def assembly_of(executable: Any) -> str:
    """The x86 assembly of every LLVM module in a ``tvm.compile`` result."""

    def modules(module: Any) -> Any:
        yield module
        for imported in module.imports:
            yield from modules(imported)

    root = getattr(executable, "mod", executable)
    return "".join(m.inspect_source("asm") for m in modules(root) if m.kind == "llvm")
