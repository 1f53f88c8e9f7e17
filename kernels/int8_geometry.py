"""What an int8 convolution is and how its kernel is laid out: the numpy side of
:mod:`detc.kernels.conv2d_int8` (no TVM expressions are built here).

:class:`QuantizedConv2d` holds the ONNX constants and derives the kernel's (folded bias,
requantization multiplier); :class:`Int8Isa` is what the target's CPU offers; :class:`Geometry`
is the register tile and accumulator layout (*channels* or *pixels*) of one workload, with
:func:`default_tiles` the untuned choice. The layouts themselves are described in
:mod:`detc.kernels.conv2d_int8`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm

#: input channels one ``vpdpbusd`` lane reduces
REDUCE_BLOCK = 4
#: accumulator layouts (:class:`Geometry`)
CHANNELS = "channels"
PIXELS = "pixels"
#: the schedule's knobs: ``layout`` (CHANNELS or PIXELS), ``oc_tile``, ``ow_tile``
Tiles = dict[str, Any]


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


def pad_channels(values: np.ndarray, lanes: int) -> np.ndarray:
    padded = np.zeros(-(-values.shape[0] // lanes) * lanes, dtype=values.dtype)
    padded[: values.shape[0]] = values
    return padded


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


def plan_geometry(
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
