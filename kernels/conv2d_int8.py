"""Quantized 2-D convolution for x86: 8-bit × int8 → int32, requantized in the same function.

The function computes what onnxruntime's ``QLinearConv`` computes (MLAS), bit for bit::

    acc[c] = Σ (x - x_zp) · w[c] + bias_q[c]                          (int32, exact)
    y[c]   = saturate(round_half_even(float(acc[c]) · m[c]) + y_zp)
    m[c]   = x_scale · w_scale[c] / y_scale                           (float32)

``m`` is computed in float32 in that order, ``float(acc)`` rounds like ``cvtdq2ps``, the product
is one float32 multiply (no FMA can form: nothing is added after it in float) and the rounding is
half to even, like ``cvtps2dq`` under the default MXCSR mode (:func:`quantized_output`).

Since ``Σ (x - x_zp)·w = Σ x·w - x_zp·Σ w``, the kernel multiplies the raw 8-bit values and folds
``-x_zp·Σ w[c]`` into the bias at compile time; zero padding becomes padding with ``x_zp``.
Weight zero points must be 0 (symmetric weights, what onnxruntime's quantizer produces).

Layouts (``L`` = int32 lanes of the accumulator vector: 16 with AVX-512, 8 with AVX2)::

    data     [N, C, H, W]                 uint8 or int8 (int8 is shifted by +128 on packing)
    packed   [N, C/4, H', W', 4]          uint8: four input channels per 32-bit word, padded
    kernel   [OC/L, C/4, KH, KW, L, 4]    int8  (:func:`pack_weight`)
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
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from detc.kernels.fast_math import exp_float32, round_half_even_to_int32

#: block annotation that marks the int8 convolution in a PrimFunc
CONV_INT8_MARK = "detc.conv2d_int8"
#: input channels one ``vpdpbusd`` lane reduces
REDUCE_BLOCK = 4
#: accumulator layouts (:class:`Geometry`)
CHANNELS = "channels"
PIXELS = "pixels"
#: the schedule's knobs: ``layout`` (CHANNELS or PIXELS), ``oc_tile``, ``ow_tile``
Tiles = dict[str, Any]

_INTRINSICS = {
    # lanes → (tensor intrinsic name, LLVM intrinsic)
    16: ("detc_dot_16x4_u8i8i32_vnni", "llvm.x86.avx512.vpdpbusd.512"),
    8: ("detc_dot_8x4_u8i8i32_vnni", "llvm.x86.avx512.vpdpbusd.256"),
}


@dataclass(frozen=True)
class Int8Isa:
    """What the int8 kernel uses on a target: accumulator lanes and whether it has VNNI."""

    lanes: int
    vnni: bool
    #: vector registers available for the accumulator tile
    registers: int

    @property
    def name(self) -> str:
        if self.vnni:
            return "avx512-vnni" if self.lanes == 16 else "avx-vnni"
        return "avx512" if self.lanes == 16 else "generic"


def int8_isa(target: tvm.target.Target) -> Int8Isa:
    """The kernel variant for ``target`` (LLVM's view of its ``mcpu``/``mattr``)."""
    from tvm.target import codegen

    def has(feature: str) -> bool:
        return bool(codegen.target_has_features([feature], target))

    if has("avx512vnni") and has("avx512bw"):
        return Int8Isa(lanes=16, vnni=True, registers=32)
    if has("avxvnni"):
        return Int8Isa(lanes=8, vnni=True, registers=16)
    if has("avx512bw"):
        return Int8Isa(lanes=16, vnni=False, registers=32)
    return Int8Isa(lanes=8, vnni=False, registers=16)


@dataclass(frozen=True)
class QuantizedConv2d:
    """Everything a quantized convolution needs, with numpy constants (layouts as in ONNX)."""

    weight: np.ndarray  # int8 [OC, C, KH, KW], zero point 0
    weight_scale: np.ndarray  # float32 [OC]
    bias: np.ndarray | None  # int32 [OC] in units of x_scale * weight_scale (or None)
    input_scale: float
    input_zero_point: int
    input_dtype: str  # "uint8" | "int8"
    output_scale: float
    output_zero_point: int
    output_dtype: str  # "uint8" | "int8", or "float32": dequantized, no requantization
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    #: clamp below at the output zero point (a ReLU between the convolution and its quantize)
    relu: bool = False
    #: float32 [OC] added after the scaling (float32 output only): a bias not quantized to
    #: x_scale * w_scale
    float_bias: np.ndarray | None = None
    #: "silu" (``v · sigmoid(v)``) or "sigmoid" of the dequantized sum, before the output is
    #: quantized (or returned as float). The activation runs in float, as onnxruntime runs it
    #: between the convolution and the quantize, so 8-bit results may differ from it by 1
    #: where the float value sits at a rounding boundary.
    activation: str | None = None

    @property
    def float_output(self) -> bool:
        return self.output_dtype == "float32"

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(out_h, out_w) of this convolution on an image of ``height`` × ``width``."""
        (kernel_h, kernel_w), (stride_h, stride_w) = self.weight.shape[2:], self.strides
        dilation_h, dilation_w = self.dilation
        top, left, bottom, right = self.padding
        out_h = (height + top + bottom - (kernel_h - 1) * dilation_h - 1) // stride_h + 1
        out_w = (width + left + right - (kernel_w - 1) * dilation_w - 1) // stride_w + 1
        return out_h, out_w

    def requant_multiplier(self) -> np.ndarray:
        """float32 [OC]: ``x_scale * w_scale / y_scale``, evaluated in float32 left to right as
        onnxruntime's QLinearConv does (the order changes the last bit). A float32 output has
        ``y_scale`` 1: the multiplier dequantizes."""
        product = np.float32(self.input_scale) * self.weight_scale.astype(np.float32)
        return (product / np.float32(self.output_scale)).astype(np.float32)

    def dequant_multiplier(self) -> np.ndarray:
        """float32 [OC]: ``x_scale * w_scale``, the float value of one accumulator unit."""
        return (np.float32(self.input_scale) * self.weight_scale.astype(np.float32)).astype(
            np.float32
        )

    def kernel_multiplier(self) -> np.ndarray:
        """The per-channel multiplier the kernel applies to the int32 sum: straight to the
        output's scale without an activation, to float (dequantized) with one."""
        return self.dequant_multiplier() if self.activation else self.requant_multiplier()

    def _folded_bias_int64(self) -> np.ndarray:
        zero_point = _packed_zero_point(self.input_zero_point, self.input_dtype)
        sums = self.weight.reshape(self.weight.shape[0], -1).astype(np.int64).sum(axis=1)
        bias = np.zeros(self.weight.shape[0], np.int64) if self.bias is None else self.bias
        return bias.astype(np.int64) - zero_point * sums

    def accumulator_fits_int32(self) -> bool:
        """Whether no input can overflow the int32 accumulator (raw 8-bit products plus the
        folded bias); always true for detector-sized convolutions."""
        magnitudes = np.abs(self.weight.reshape(self.weight.shape[0], -1).astype(np.int64))
        worst = 255 * magnitudes.sum(axis=1) + np.abs(self._folded_bias_int64())
        return bool(worst.max(initial=0) < 2**31)

    def folded_bias(self) -> np.ndarray:
        """int32 [OC]: the bias with ``-x_zp · Σ w`` folded in (the kernel multiplies raw x)."""
        if not self.accumulator_fits_int32():
            raise ValueError("the int32 accumulator of this convolution could overflow")
        return self._folded_bias_int64().astype(np.int32)


def _packed_zero_point(zero_point: int, dtype: str) -> int:
    """Zero point of the packed (always unsigned) data: int8 data is shifted by +128."""
    return int(zero_point) + (128 if dtype == "int8" else 0)


def _output_range(dtype: str) -> tuple[int, int]:
    return (-128, 127) if dtype == "int8" else (0, 255)


def quantized_output(value: Any, conv: QuantizedConv2d) -> Any:
    """``value`` (float32, in units of the output scale) as the output integer, as
    onnxruntime stores it: rounded half to even, plus the zero point, saturated to the output
    type (at the zero point from below under a ReLU). The clamp comes first, in float, to keep
    the rounding in range; its bounds are integers, so clamp-then-round equals MLAS's
    round-then-saturate."""
    low, high = _output_range(conv.output_dtype)
    if conv.relu:
        low = max(low, conv.output_zero_point)
    lower = tirx.const(float(low - conv.output_zero_point), "float32")
    upper = tirx.const(float(high - conv.output_zero_point), "float32")
    clamped = tirx.max(tirx.min(value, upper), lower)
    rounded = round_half_even_to_int32(clamped) + conv.output_zero_point
    return rounded.astype(conv.output_dtype)


def pack_weight(weight: np.ndarray, lanes: int) -> np.ndarray:
    """int8 OIHW → [OC/L, C/4, KH, KW, L, 4] (channels zero-padded to whole blocks)."""
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    padded_out = -(-out_channels // lanes) * lanes
    padded_in = -(-in_channels // REDUCE_BLOCK) * REDUCE_BLOCK
    padded = np.zeros((padded_out, padded_in, kernel_h, kernel_w), dtype=np.int8)
    padded[:out_channels, :in_channels] = weight
    blocked = padded.reshape(
        padded_out // lanes,
        lanes,
        padded_in // REDUCE_BLOCK,
        REDUCE_BLOCK,
        kernel_h,
        kernel_w,
    )
    return np.ascontiguousarray(blocked.transpose(0, 2, 4, 5, 1, 3))


def _pad_channels(values: np.ndarray, lanes: int) -> np.ndarray:
    padded = np.zeros(-(-values.shape[0] // lanes) * lanes, dtype=values.dtype)
    padded[: values.shape[0]] = values
    return padded


# ---- the computation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    out_h: int
    out_w: int
    ow_tile: int
    oc_tile: int
    #: ``"channels"``: the accumulator vector is ``lanes`` output channels of one pixel (tile:
    #: ``oc_tile`` channel blocks × ``ow_tile`` pixels); ``"pixels"``: it is ``lanes``
    #: neighbouring output pixels of one channel (tile: ``oc_tile`` channels × ``ow_tile``
    #: pixels, a multiple of ``lanes``), which needs stride 1 along the width
    layout: str = CHANNELS

    @property
    def padded_out_w(self) -> int:
        return -(-self.out_w // self.ow_tile) * self.ow_tile

    @property
    def padded_out_channels(self) -> int:
        """Output channels the accumulator holds (the pixel layout pads to whole tiles)."""
        return -(-self.out_channels // self.oc_tile) * self.oc_tile


def _geometry(
    data_shape: tuple[int, ...], conv: QuantizedConv2d, isa: Int8Isa, tiles: Tiles | None
) -> Geometry:
    batch, in_channels, height, width = data_shape
    out_channels, weight_in, kernel_h, kernel_w = conv.weight.shape
    if weight_in != in_channels:
        raise ValueError(f"weight {conv.weight.shape} does not match data {data_shape}")
    out_h, out_w = conv.output_size(height, width)
    chosen = dict(tiles or {})
    layout = str(chosen.get("layout") or CHANNELS)
    if layout == PIXELS:
        if not pixel_layout_applies(conv, isa):
            raise ValueError("the pixel layout needs VNNI and stride 1 along the width")
        oc_tile = int(chosen.get("oc_tile") or 4)
        ow_tile = int(chosen.get("ow_tile") or isa.lanes * 4)
        if ow_tile % isa.lanes or out_w % ow_tile:
            # A partial pixel tile would need a predicated vector epilogue (LLVM 22 aborts on
            # the one TVM emits): the tile must divide the row.
            raise ValueError(
                f"ow_tile {ow_tile} is not a multiple of {isa.lanes} pixels dividing {out_w}"
            )
    elif layout == CHANNELS:
        out_blocks = -(-out_channels // isa.lanes)
        oc_tile = int(chosen.get("oc_tile") or (2 if out_blocks % 2 == 0 else 1))
        if out_blocks % oc_tile:
            raise ValueError(f"oc_tile {oc_tile} does not divide {out_blocks} channel blocks")
        budget = (isa.registers * 3 // 4) // oc_tile
        ow_tile = int(chosen.get("ow_tile") or pick_ow_tile(out_w, budget))
    else:
        raise ValueError(f"unknown accumulator layout {layout!r} ({CHANNELS}, {PIXELS})")
    return Geometry(
        batch,
        in_channels,
        height,
        width,
        out_channels,
        kernel_h,
        kernel_w,
        out_h,
        out_w,
        ow_tile,
        oc_tile,
        layout,
    )


def pixel_layout_applies(conv: QuantizedConv2d, isa: Int8Isa) -> bool:
    """Whether the pixel layout can compute ``conv``: one ``vpdpbusd`` reads ``lanes``
    neighbouring packed pixels as one contiguous vector (stride 1 along the width)."""
    return isa.vnni and conv.strides[1] == 1


def flattens_pixels(conv: QuantizedConv2d) -> bool:
    """A 1×1 convolution with stride 1 and no padding reads pixel ``p`` for output ``p``: it
    runs on the image as one row of ``H·W`` pixels (no tile ever straddles a row end)."""
    return conv.weight.shape[2:] == (1, 1) and conv.strides == (1, 1) and not any(conv.padding)


def pick_ow_tile(out_w: int, budget: int) -> int:
    """The pixel tile: as wide as the register budget allows, wasting the fewest padded pixels
    (the last tile of a row is computed on padding when the tile does not divide the row)."""
    budget = max(1, min(budget, out_w))
    candidates = range(budget, max(1, budget // 2) - 1, -1)
    return min(candidates, key=lambda t: (-(-out_w // t) * t - out_w, -t))


def packed_input(data: te.Tensor, conv: QuantizedConv2d, g: Geometry, dtype: str) -> te.Tensor:
    """``[N, C, H, W]`` → ``[N, C/4, H', W', 4]`` of ``dtype``: four input channels per 32-bit
    word, what one dot-product step reads. ``H'``, ``W'`` cover every row and column the padded
    output reads (past the image on the right where the output width is padded to whole
    tiles); outside the image, and in the channels that pad C to a multiple of 4, it holds the
    input zero point. Data of the other signedness is shifted by ±128 (exact; the folded bias
    makes up for it)."""
    stride_h, stride_w = conv.strides
    dilation_h, dilation_w = conv.dilation
    top, left, _, _ = conv.padding
    in_blocks = -(-g.in_channels // REDUCE_BLOCK)
    packed_h = (g.out_h - 1) * stride_h + (g.kernel_h - 1) * dilation_h + 1
    packed_w = (g.padded_out_w - 1) * stride_w + (g.kernel_w - 1) * dilation_w + 1
    shift = 0 if conv.input_dtype == dtype else (128 if dtype == "uint8" else -128)
    zero_point = int(conv.input_zero_point) + shift
    whole_blocks = g.in_channels % REDUCE_BLOCK == 0

    def pack(n: Any, cb: Any, h: Any, w: Any, c: Any) -> Any:
        channel = cb * REDUCE_BLOCK + c
        y, x = h - top, w - left
        if whole_blocks:
            # A pure padding pattern (bounds on single loop variables only): the schedule splits
            # it into a fill and a condition-free copy (decompose_padding).
            inside = tirx.all(y >= 0, y < g.height, x >= 0, x < g.width)
            value = data[n, channel, y, x]
        else:
            inside = tirx.all(y >= 0, y < g.height, x >= 0, x < g.width, channel < g.in_channels)
            value = data[n, tirx.min(channel, g.in_channels - 1), y, x]
        if shift:
            value = (value.astype("int32") + shift).astype(dtype)
        return tirx.if_then_else(inside, value, tirx.const(zero_point, dtype))

    shape = (g.batch, in_blocks, packed_h, packed_w, REDUCE_BLOCK)
    return te.compute(shape, pack, name="pack")


def channel_layout_sum(
    packed: te.Tensor, kernel: te.Tensor, conv: QuantizedConv2d, g: Geometry, lanes: int
) -> te.Tensor:
    """The int32 accumulator ``[N, OC/lanes, OH, OW', lanes]``: for each output pixel and
    block of ``lanes`` output channels, the sum over input-channel words, kernel rows and
    columns and the 4 channels of a word (one dot-product step per word)."""
    stride_h, stride_w = conv.strides
    dilation_h, dilation_w = conv.dilation
    icb = te.reduce_axis((0, packed.shape[1]), name="icb")
    kh = te.reduce_axis((0, g.kernel_h), name="kh")
    kw = te.reduce_axis((0, g.kernel_w), name="kw")
    ic = te.reduce_axis((0, REDUCE_BLOCK), name="ic")

    def accumulate(n: Any, ob: Any, oh: Any, ow: Any, oc: Any) -> Any:
        pixel = packed[n, icb, oh * stride_h + kh * dilation_h, ow * stride_w + kw * dilation_w, ic]
        return te.sum(
            pixel.astype("int32") * kernel[ob, icb, kh, kw, oc, ic].astype("int32"),
            axis=[icb, kh, kw, ic],
        )

    out_blocks = -(-g.out_channels // lanes)
    return te.compute(
        (g.batch, out_blocks, g.out_h, g.padded_out_w, lanes),
        accumulate,
        name="conv2d_int8",
        attrs={CONV_INT8_MARK: 1},
    )


def _pixel_layout_sum(
    packed: te.Tensor, kernel: te.Tensor, conv: QuantizedConv2d, g: Geometry
) -> te.Tensor:
    """The int32 accumulator ``[N, OC', OH, OW']`` of the pixel layout (stride 1 along the
    width): ``lanes`` neighbouring ``ow`` read neighbouring packed pixels."""
    stride_h = conv.strides[0]
    dilation_h, dilation_w = conv.dilation
    icb = te.reduce_axis((0, packed.shape[1]), name="icb")
    kh = te.reduce_axis((0, g.kernel_h), name="kh")
    kw = te.reduce_axis((0, g.kernel_w), name="kw")
    ic = te.reduce_axis((0, REDUCE_BLOCK), name="ic")

    def accumulate(n: Any, c: Any, oh: Any, ow: Any) -> Any:
        pixel = packed[n, icb, oh * stride_h + kh * dilation_h, ow + kw * dilation_w, ic]
        weight = kernel[c // g.oc_tile, icb, kh, kw, c % g.oc_tile, ic]
        return te.sum(pixel.astype("int32") * weight.astype("int32"), axis=[icb, kh, kw, ic])

    return te.compute(
        (g.batch, g.padded_out_channels, g.out_h, g.padded_out_w),
        accumulate,
        name="conv2d_int8",
        attrs={CONV_INT8_MARK: 1},
    )


def output_stage(
    acc: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    float_bias: te.Tensor | None,
    conv: QuantizedConv2d,
    g: Geometry,
    lanes: int,
) -> te.Tensor:
    """The accumulator to the NCHW output: requantized (``round(float(Σ + bias) · m)``), or
    through the float epilogue when the output is float or an activation comes first."""
    if conv.float_output or conv.activation:
        return _dequantize_epilogue(acc, bias, multiplier, float_bias, conv, g, lanes)

    def requantize(n: Any, c: Any, h: Any, w: Any) -> Any:
        total = _accumulated(acc, g, lanes, n, c, h, w) + bias[c]
        return quantized_output(total.astype("float32") * multiplier[c], conv)

    return te.compute((g.batch, g.out_channels, g.out_h, g.out_w), requantize, name="requantize")


def _conv2d_int8_compute(
    data: te.Tensor,
    kernel: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    float_bias: te.Tensor | None,
    conv: QuantizedConv2d,
    geometry: Geometry,
    lanes: int,
) -> te.Tensor:
    """pack (unsigned, for ``vpdpbusd``) → int32 convolution (register tile) → requantize (or
    dequantize), NCHW in and out."""
    packed = packed_input(data, conv, geometry, "uint8")
    if geometry.layout == PIXELS:
        acc = _pixel_layout_sum(packed, kernel, conv, geometry)
    else:
        acc = channel_layout_sum(packed, kernel, conv, geometry, lanes)
    return output_stage(acc, bias, multiplier, float_bias, conv, geometry, lanes)


def _accumulated(acc: te.Tensor, g: Geometry, lanes: int, n: Any, c: Any, h: Any, w: Any) -> Any:
    """The int32 sum of output ``(n, c, h, w)`` in either accumulator layout."""
    if g.layout == PIXELS:
        return acc[n, c, h, w]
    return acc[n, c // lanes, h, w, c % lanes]


def _dequantize_epilogue(
    acc: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    float_bias: te.Tensor | None,
    conv: QuantizedConv2d,
    g: Geometry,
    lanes: int,
) -> te.Tensor:
    """float(Σ + bias) · x_scale·w_scale [+ float bias] [→ activation] [→ quantize].

    With an activation the arithmetic runs in the accumulator's blocked layout (stage
    ``activate``: the vector is 16 output channels, the tile stays in registers) and a last
    stage only moves the finished values to NCHW; computed in NCHW order the activation read
    the tile with a stride of ``lanes`` and ran 4x slower than the convolution itself."""
    shape = (g.batch, g.out_channels, g.out_h, g.out_w)
    if conv.activation is None:

        def dequantize(n: Any, c: Any, h: Any, w: Any) -> Any:
            total = _accumulated(acc, g, lanes, n, c, h, w) + bias[c]
            scaled = total.astype("float32") * multiplier[c]
            return scaled if float_bias is None else scaled + float_bias[c]

        return te.compute(shape, dequantize, name="requantize")
    if conv.activation not in ("silu", "sigmoid"):
        raise ValueError(f"unsupported activation {conv.activation!r} (silu, sigmoid)")

    def dequantize_blocked(n: Any, ob: Any, h: Any, w: Any, lane: Any) -> Any:
        c = ob * lanes + lane
        scaled = (acc[n, ob, h, w, lane] + bias[c]).astype("float32") * multiplier[c]
        return scaled if float_bias is None else scaled + float_bias[c]

    def dequantize_pixels(n: Any, c: Any, h: Any, w: Any) -> Any:
        scaled = (acc[n, c, h, w] + bias[c]).astype("float32") * multiplier[c]
        return scaled if float_bias is None else scaled + float_bias[c]

    pixels = g.layout == PIXELS
    if pixels:
        # The accumulator is already NCHW (padded): the activation runs over pixel vectors
        # and writes the output directly.
        value = te.compute(shape, dequantize_pixels, name="dequantize")
    else:
        value = te.compute(acc.shape, dequantize_blocked, name="dequantize")
    # sigmoid(v) = 1 / (1 + exp(-v)). One division per output: SiLU's v · sigmoid(v) / scale
    # becomes v / ((1 + exp(-v)) · scale). Per 16 outputs the exp and the divisions cost more
    # than a small 1x1 convolution's dot products; rounding differs from onnxruntime's order
    # in the last float bit, so an 8-bit result can differ by 1 at a rounding boundary.
    exp_neg = te.compute(
        value.shape, lambda *i: exp_float32(tirx.const(0.0, "float32") - value(*i)), name="exp"
    )
    numerator = value if conv.activation == "silu" else None
    scale = (
        None if conv.float_output else tirx.const(float(np.float32(conv.output_scale)), "float32")
    )

    def activate(*i: Any) -> Any:
        denominator = tirx.const(1.0, "float32") + exp_neg(*i)
        if scale is not None:
            denominator = denominator * scale
        top = numerator(*i) if numerator is not None else tirx.const(1.0, "float32")
        quotient = top / denominator
        # quantized as QuantizeLinear stores it: rounded half to even and saturated
        return quotient if scale is None else quantized_output(quotient, conv)

    if pixels:
        return te.compute(shape, activate, name="requantize")
    activated = te.compute(acc.shape, activate, name="activate")
    return te.compute(
        shape,
        lambda n, c, h, w: activated[n, c // lanes, h, w, c % lanes],
        name="requantize",
    )


# ---- the tensor intrinsic ----------------------------------------------------------------------


@functools.cache
def _register_dot_intrinsic(lanes: int) -> str:
    """Register the ``lanes × 4`` u8·s8 → s32 dot product (once per process).

    TVM ships a 16×4 VNNI intrinsic in ``tvm.s_tir.tensor_intrin.x86``, but importing that package
    parses every GPU intrinsic (~30-60 s here) and its ``vpdpbusd`` call uses the pre-LLVM-20
    signature (``<16 x i32>`` operands; LLVM 22 wants ``<64 x i8>``), so detc registers its own.
    The accumulator buffer is in the default scope: a ``local`` one became a per-tile heap
    allocation (see the module doc).
    """
    name, llvm_intrinsic = _INTRINSICS[lanes]
    word_bytes = lanes * REDUCE_BLOCK

    @T.prim_func(s_tir=True)
    def description(
        a: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((lanes, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((lanes,), "int32", offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def implementation(
        a: T.Buffer((4,), "uint8", offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((lanes, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((lanes,), "int32", offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            # One expression, no named temporaries: TVM lowers each named value to a
            # per-tile TVMBackendAllocWorkspace call (heap memory, not a register).
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic),
                c.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(
                    T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), lanes),
                    dtype=f"int8x{word_bytes}",
                ),
                b.vload([0, 0], dtype=f"int8x{word_bytes}"),
                dtype=f"int32x{lanes}",
            )

    tvm.s_tir.TensorIntrin.register(name, description, implementation, override=True)
    return name


@functools.cache
def _register_pixel_dot_intrinsic(lanes: int) -> str:
    """Register the pixel layout's step (once per process): ``lanes`` packed pixels (4 input
    channels each, one contiguous vector) times one output channel's 4 weight bytes
    (broadcast), added into ``lanes`` int32 lanes: the same ``vpdpbusd`` with the roles of the
    operands swapped (the pixels are the unsigned operand either way)."""
    _, llvm_intrinsic = _INTRINSICS[lanes]
    name = f"detc_dot_pixels_{lanes}x4_u8i8i32_vnni"
    word_bytes = lanes * REDUCE_BLOCK

    @T.prim_func(s_tir=True)
    def description(
        a: T.Buffer((lanes, 4), "uint8", offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((4,), "int8", offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((lanes,), "int32", offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:lanes, 0:4], b[0:4])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vi, vk], "int32") * T.cast(b[vk], "int32")

    @T.prim_func(s_tir=True)
    def implementation(
        a: T.Buffer((lanes, 4), "uint8", offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((4,), "int8", offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((lanes,), "int32", offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:lanes, 0:4], b[0:4])
            T.writes(c[0:lanes])
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic),
                c.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(a.vload([0, 0], f"uint8x{word_bytes}"), dtype=f"int8x{word_bytes}"),
                T.reinterpret(
                    T.broadcast(T.reinterpret(b.vload([0], "int8x4"), dtype="int32"), lanes),
                    dtype=f"int8x{word_bytes}",
                ),
                dtype=f"int32x{lanes}",
            )

    tvm.s_tir.TensorIntrin.register(name, description, implementation, override=True)
    return name


# ---- the schedule ------------------------------------------------------------------------------


#: the reduction step of the register tile: ``(schedule, conv block, icb, oc, ic loops)``;
#: it vectorises or tensorizes the innermost ``oc × ic`` dot product and splits off the init
ReduceStep = Callable[[tvm.s_tir.Schedule, Any, Any, Any, Any], None]


def schedule_conv2d_int8_tile(
    func: tvm.tirx.PrimFunc, geometry: Geometry, isa_name: str, reduce_step: ReduceStep
) -> tvm.tirx.PrimFunc:
    """The schedule every int8 kernel shares (x86 and aarch64): register-tiled, parallel over
    (batch, channel tiles, rows); the epilogue runs on each finished tile; ``reduce_step``
    turns the innermost dot product into the architecture's instructions."""
    g = geometry
    sch = tvm.s_tir.Schedule(func)
    conv = sch.get_sblock("conv2d_int8")
    pack = sch.get_sblock("pack")
    epilogue = sch.get_sblock("requantize")
    # The activation's stages (dequantize, the sigmoid's pieces) fold into ``activate``.
    stages = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    for name in stages:
        if name not in ("pack", "conv2d_int8", "activate", "requantize"):
            sch.compute_inline(sch.get_sblock(name))
    sch.annotate(conv, "detc.ow_tile", g.ow_tile)
    sch.annotate(conv, "detc.oc_tile", g.oc_tile)
    sch.annotate(conv, "detc.isa", isa_name)

    n, ob, oh, ow, oc, icb, kh, kw, ic = sch.get_loops(conv)
    ob_outer, ob_inner = sch.split(ob, [None, g.oc_tile])
    ow_outer, ow_inner = sch.split(ow, [None, g.ow_tile])
    sch.reorder(n, ob_outer, oh, ow_outer, icb, kh, kw, ob_inner, ow_inner, oc, ic)
    sch.parallel(sch.fuse(n, ob_outer, oh))
    if "activate" in stages:
        # On the finished tile, in its blocked layout: the channels of an accumulator
        # register are the vector.
        activate = sch.get_sblock("activate")
        sch.reverse_compute_at(activate, ow_outer, preserve_unit_loops=True)
        *_, act_ob, _, act_ow, act_lane = sch.get_loops(activate)
        sch.unroll(act_ob)
        sch.unroll(act_ow)
        sch.vectorize(act_lane)
    sch.reverse_compute_at(epilogue, ow_outer, preserve_unit_loops=True)
    for loop in (ob_inner, ow_inner):
        sch.unroll(loop)
    reduce_step(sch, conv, icb, oc, ic)
    # Epilogue loops (n, c, h, w) under the tile: contiguous output pixels are the vector, and
    # the channels unrolled so that every read of the accumulator tile has a constant index
    # (the tile then stays in registers instead of being reloaded from the stack: -12% here).
    epilogue_loops = sch.get_loops(epilogue)
    sch.unroll(epilogue_loops[-3])
    sch.vectorize(epilogue_loops[-1])

    schedule_pack(sch, pack, whole_blocks=g.in_channels % REDUCE_BLOCK == 0)
    return sch.mod["main"]


def _schedule_conv2d_int8(
    func: tvm.tirx.PrimFunc, isa: Int8Isa, geometry: Geometry
) -> tvm.tirx.PrimFunc:
    """x86: the dot product tensorized with ``vpdpbusd`` when ``isa.vnni``, else left to
    LLVM's vectoriser (exact ``vpmaddwd``)."""

    def reduce_step(sch: tvm.s_tir.Schedule, conv: Any, icb: Any, oc: Any, ic: Any) -> None:
        if isa.vnni:
            init = sch.decompose_reduction(conv, icb)
            sch.vectorize(sch.get_loops(init)[-1])
            sch.tensorize(oc, _register_dot_intrinsic(isa.lanes))
        else:
            # The vectoriser needs the reduction inside out: lanes innermost, channels unrolled.
            sch.reorder(ic, oc)
            sch.unroll(ic)
            sch.vectorize(oc)
            sch.decompose_reduction(conv, icb)

    return schedule_conv2d_int8_tile(func, geometry, isa.name, reduce_step)


def _schedule_conv2d_int8_pixels(
    func: tvm.tirx.PrimFunc, isa: Int8Isa, geometry: Geometry
) -> tvm.tirx.PrimFunc:
    """The pixel layout (x86 with VNNI): a tile of ``oc_tile`` channels × ``ow_tile`` pixels
    (``ow_tile / lanes`` vectors), parallel over every tile; the epilogue runs on each
    finished tile and stores whole pixel vectors straight into NCHW (no transposition)."""
    g = geometry
    lanes = isa.lanes
    sch = tvm.s_tir.Schedule(func)
    conv = sch.get_sblock("conv2d_int8")
    pack = sch.get_sblock("pack")
    epilogue = sch.get_sblock("requantize")
    stages = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    for name in stages:
        if name not in ("pack", "conv2d_int8", "requantize"):
            sch.compute_inline(sch.get_sblock(name))
    sch.annotate(conv, "detc.ow_tile", g.ow_tile)
    sch.annotate(conv, "detc.oc_tile", g.oc_tile)
    sch.annotate(conv, "detc.isa", f"{isa.name}-pixels")

    n, c, oh, ow, icb, kh, kw, ic = sch.get_loops(conv)
    c_outer, c_inner = sch.split(c, [None, g.oc_tile])
    ow_outer, ow_vector, ow_lane = sch.split(ow, [None, g.ow_tile // lanes, lanes])
    sch.reorder(n, c_outer, oh, ow_outer, icb, kh, kw, c_inner, ow_vector, ow_lane, ic)
    tile = sch.fuse(n, c_outer, oh, ow_outer)
    sch.parallel(tile)
    sch.reverse_compute_at(epilogue, tile, preserve_unit_loops=True)
    sch.unroll(c_inner)
    sch.unroll(ow_vector)
    init = sch.decompose_reduction(conv, icb)
    init_lane = sch.get_loops(init)[-1]
    sch.vectorize(init_lane)
    sch.tensorize(ow_lane, _register_pixel_dot_intrinsic(lanes))
    *_, epi_c, _, epi_w = sch.get_loops(epilogue)
    epi_vector, epi_lane = sch.split(epi_w, [None, lanes])
    sch.unroll(epi_c)
    sch.unroll(epi_vector)
    sch.vectorize(epi_lane)

    schedule_pack(sch, pack, whole_blocks=g.in_channels % REDUCE_BLOCK == 0)
    return sch.mod["main"]


def schedule_pack(sch: tvm.s_tir.Schedule, pack: Any, whole_blocks: bool) -> None:
    """NCHW → NCHW4c with zero-point padding. With whole channel blocks the padding is filled
    first and the image copied without conditions, which LLVM vectorises into byte interleaves
    (5x faster than the guarded copy: 0.26 → 0.05 ms for 64×82×82 here); otherwise (RGB input)
    the guarded copy stays, vectorised over the four channels."""
    loops = sch.get_loops(pack)
    if not whole_blocks:
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])
        return
    try:
        fill = sch.decompose_padding(pack, loops[0])
    except tvm.s_tir.schedule.ScheduleError:  # nothing to pad: the condition is always true
        pass
    else:
        fill_loops = sch.get_loops(fill)
        sch.parallel(sch.fuse(*fill_loops[:3]))
        sch.vectorize(sch.fuse(*fill_loops[3:]))
    copy_loops = sch.get_loops(pack)
    sch.parallel(sch.fuse(*copy_loops[:3]))
    sch.unroll(copy_loops[-1])


# ---- one call for the Relax lowering -----------------------------------------------------------

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


def default_tiles(data_shape: tuple[int, ...], conv: QuantizedConv2d, isa: Int8Isa) -> Tiles:
    """The schedule an untuned build uses; a tuned build measures a grid per workload instead
    (:mod:`detc.kernels.int8_tiles`). The rules are what that search chose for yolov5n's 35
    int8 workloads on an AVX512-VNNI CPU (Emerald Rapids, 2 threads):

    * 8-bit output and at least 128 channels, or no pixel tile fits: the channel layout, 4
      channel blocks × 5 pixels where the blocks divide by 4 (a wide channel tile reads each
      broadcast pixel for 64 channels), else 2 blocks × up to 3/4 of the registers;
    * otherwise the pixel layout, 8 channels × 32 pixels where 32 divides the row (a 1×1
      convolution's row is the whole image), else 3 × 80: its epilogue stores whole pixel
      vectors to NCHW, the channel layout's transposes 16-channel vectors byte by byte, and on
      the short reductions of 1×1 convolutions the epilogue is most of the time.
    """
    out_blocks = -(-conv.weight.shape[0] // isa.lanes)
    channel_tiles: Tiles = {"layout": CHANNELS}
    if out_blocks % 4 == 0:
        channel_tiles = {"layout": CHANNELS, "oc_tile": 4, "ow_tile": 5}
    if not pixel_layout_applies(conv, isa):
        return channel_tiles
    if conv.output_dtype != "float32" and conv.weight.shape[0] >= 128:
        return channel_tiles
    _, _, height, width = data_shape
    if flattens_pixels(conv):
        row = height * width
    else:
        reach = (conv.weight.shape[3] - 1) * conv.dilation[1]
        row = width + conv.padding[1] + conv.padding[3] - reach
    for oc_tile, vectors in ((8, 2), (3, 5)):
        if row % (vectors * isa.lanes) == 0:
            return {"layout": PIXELS, "oc_tile": oc_tile, "ow_tile": vectors * isa.lanes}
    return channel_tiles


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
    geometry = _geometry(func_shape, conv, isa, chosen)
    channel_multiple = geometry.oc_tile if pixels else isa.lanes
    packed_weight = pack_weight(conv.weight, channel_multiple)
    bias = _pad_channels(conv.folded_bias(), channel_multiple)
    multiplier = _pad_channels(conv.kernel_multiplier(), channel_multiple)
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
        constants.append(_pad_channels(conv.float_bias.astype(np.float32), channel_multiple))
        float_bias_t = te.placeholder(constants[-1].shape, "float32", name="float_bias")
        inputs.append(float_bias_t)
    out = _conv2d_int8_compute(
        data, kernel, bias_t, multiplier_t, float_bias_t, conv, geometry, isa.lanes
    )
    func = te.create_prim_func([*inputs, out])
    if pixels:
        func = _schedule_conv2d_int8_pixels(func, isa, geometry)
    else:
        func = _schedule_conv2d_int8(func, isa, geometry)
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
