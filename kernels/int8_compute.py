"""The int8 convolution as TVM tensor expressions: pack → int32 sum → output stage.

Shared by the x86 and aarch64 kernels, so that both compute the same integer and float
operations in the same order by construction (:mod:`detc.kernels.conv2d_int8` states the
arithmetic; :mod:`detc.kernels.int8_schedules` turns these stages into a register tile).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import te, tirx

from detc.kernels.fast_math import exp_float32, round_half_even_to_int32
from detc.kernels.int8_geometry import PIXELS, REDUCE_BLOCK, Geometry, QuantizedConv2d

#: block annotation that marks the int8 convolution in a PrimFunc
CONV_INT8_MARK = "detc.conv2d_int8"


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


def pixel_layout_sum(
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


def conv2d_int8_compute(
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
        acc = pixel_layout_sum(packed, kernel, conv, geometry)
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
