"""Quantized 2-D convolution for aarch64: int8 × int8 → int32 with NEON, requantized in place.

Same contract and arithmetic as the x86 kernel (:mod:`detc.kernels.conv2d_int8`), bit for bit
what onnxruntime's ``QLinearConv`` computes::

    acc[c] = Σ (x - x_zp) · w[c] + bias_q[c]                          (int32, exact)
    y[c]   = saturate(round_half_even(float(acc[c]) · m[c]) + y_zp)
    m[c]   = x_scale · w_scale[c] / y_scale                           (float32)

``float(acc)`` is ``scvtf`` (round to nearest even, like ``cvtdq2ps``), the product one float32
multiply and the rounding ``frinti`` under the default FPCR mode (half to even): the same IEEE
operations, in the same order, as on x86. A float epilogue (a float32 output, or an
activation fused before the quantize) is built by the x86 kernel's own code
(``output_stage``): ``float(acc) · x_scale·w_scale`` [+ float bias] [→ activation]
[→ ``/ y_scale``, round half to even, saturate].

The ARM dot products are signed × signed (``sdot``; ``smull`` without it), so the packed data is
*int8*: uint8 activations are shifted by -128 on packing (``x - 128``, exact in int8) and the
shift moves into the bias at compile time: ``Σ (x - x_zp)·w = Σ x_s·w - (x_zp - 128)·Σ w`` with
``x_s = x - 128``; int8 activations are packed as they are. Zero padding becomes padding with the
shifted zero point. Weight zero points must be 0.

Layouts (4 int32 lanes per NEON register)::

    data     [N, C, H, W]                 uint8 or int8
    packed   [N, C/4, H', W', 4]          int8: four input channels per 32-bit word, padded
    kernel   [OC/4, C/4, KH, KW, 4, 4]    int8  (:func:`~detc.kernels.int8_geometry.pack_weight`)
    acc      [N, OC/4, OH, OW', 4]        int32, a register tile
    output   [N, OC, OH, OW]              uint8, int8 or float32

One step of the reduction is one 16-byte dot product: the four bytes of one pixel (broadcast)
times the 4 × 4 weight bytes of four output channels, added into four int32 lanes. With
``+dotprod`` that is one ``sdot`` (``llvm.aarch64.neon.sdot``); without it the same step is
``smull`` ×2 → ``saddlp`` ×2 → ``addp`` → ``add``: an int8 product fits int16 exactly (at most
128·128 = 16384) but a sum of two may not (32768), so products are summed pairwise into int32
(``saddlp``), never accumulated in int16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import te
from tvm.script import tirx as T

# Packing, the int32 sum and the output stage (requantize, or the float epilogue) are the x86
# kernel's own computation, so that both architectures compute the same integer and float
# operations in the same order by construction; only the packed data's signedness, the lanes
# and the tensor intrinsics differ.
from detc.kernels.conv2d_int8 import OPAQUE_PATTERN, Int8Kernel, build_conv2d_int8
from detc.kernels.int8_compute import channel_layout_sum, output_stage, packed_input
from detc.kernels.int8_geometry import (
    Geometry,
    Int8Isa,
    QuantizedConv2d,
    pack_weight,
    pick_ow_tile,
)
from detc.kernels.int8_schedules import schedule_conv2d_int8_tile

#: int32 lanes of one NEON register: output channels one dot-product step covers
LANES = 4
#: NEON vector registers (v0-v31)
_REGISTERS = 32
#: the accumulator tile may use this many registers; the rest hold weights and the pixel
_TILE_REGISTERS = 24
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
_SMULL = "llvm.aarch64.neon.smull.v8i16"
_SADDLP = "llvm.aarch64.neon.saddlp.v4i32.v8i16"
_ADDP = "llvm.aarch64.neon.addp.v4i32"


@dataclass(frozen=True)
class ArmInt8Isa(Int8Isa):
    """The aarch64 variant: ``sdot`` with the dot-product extension, else widening NEON
    multiplies (``vnni`` is always False here)."""

    dotprod: bool = False

    @property
    def name(self) -> str:
        return "neon-dotprod" if self.dotprod else "neon"


def is_aarch64(target: tvm.target.Target) -> bool:
    """Whether ``target`` generates aarch64 code (its LLVM triple)."""
    return str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64"))


def arm_int8_isa(target: tvm.target.Target) -> ArmInt8Isa:
    """The kernel variant for an aarch64 ``target`` (``feature.has_dotprod`` comes from its
    ``mcpu``/``mattr``, as LLVM sees them)."""
    dotprod = bool(target.attrs.get("feature.has_dotprod", False))
    return ArmInt8Isa(lanes=LANES, vnni=False, registers=_REGISTERS, dotprod=dotprod)


def build_conv2d_int8_for_target(
    data_shape: tuple[int, ...],
    conv: QuantizedConv2d,
    target: tvm.target.Target,
    tiles: dict[str, Any] | None = None,
) -> Int8Kernel:
    """The int8 kernel of ``target``'s architecture: aarch64 here, x86 otherwise. ``tiles``
    (x86 only: layout and register tile, see ``build_conv2d_int8``) is ignored on aarch64,
    whose kernel has one schedule."""
    if is_aarch64(target):
        return build_conv2d_int8_arm(data_shape, conv, target)
    return build_conv2d_int8(data_shape, conv, target, tiles)


# ---- constants (numpy) -------------------------------------------------------------------------


def signed_zero_point(conv: QuantizedConv2d) -> int:
    """Zero point of the packed (always signed) data: uint8 data is shifted by -128."""
    return int(conv.input_zero_point) - (128 if conv.input_dtype == "uint8" else 0)


def _folded_bias_int64(conv: QuantizedConv2d) -> np.ndarray:
    sums = conv.weight.reshape(conv.weight.shape[0], -1).astype(np.int64).sum(axis=1)
    bias = np.zeros(conv.weight.shape[0], np.int64) if conv.bias is None else conv.bias
    return bias.astype(np.int64) - signed_zero_point(conv) * sums


def folded_bias_signed(conv: QuantizedConv2d) -> np.ndarray:
    """int32 [OC]: the bias with ``-x_zp_s · Σ w`` folded in (the kernel multiplies the signed
    packed data); ValueError when some input could overflow the int32 accumulator."""
    magnitudes = np.abs(conv.weight.reshape(conv.weight.shape[0], -1).astype(np.int64))
    folded = _folded_bias_int64(conv)
    worst = 128 * magnitudes.sum(axis=1) + np.abs(folded)
    if worst.max(initial=0) >= 2**31:
        raise ValueError("the int32 accumulator of this convolution could overflow")
    return folded.astype(np.int32)


def _pad_channels(values: np.ndarray, multiple: int) -> np.ndarray:
    padded = np.zeros(-(-values.shape[0] // multiple) * multiple, dtype=values.dtype)
    padded[: values.shape[0]] = values
    return padded


# ---- the computation ---------------------------------------------------------------------------


def _geometry(data_shape: tuple[int, ...], conv: QuantizedConv2d) -> Geometry:
    batch, in_channels, height, width = data_shape
    out_channels, weight_in, kernel_h, kernel_w = conv.weight.shape
    if weight_in != in_channels:
        raise ValueError(f"weight {conv.weight.shape} does not match data {data_shape}")
    out_h, out_w = conv.output_size(height, width)
    out_blocks = -(-out_channels // LANES)
    # Four channel blocks (16 channels: four weight registers) per tile where they divide.
    oc_tile = next(t for t in (4, 2, 1) if out_blocks % t == 0)
    ow_tile = pick_ow_tile(out_w, _TILE_REGISTERS // oc_tile)
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
    )


def _conv2d_int8_compute(
    data: te.Tensor,
    kernel: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    float_bias: te.Tensor | None,
    conv: QuantizedConv2d,
    g: Geometry,
) -> te.Tensor:
    """pack (signed, for ``sdot``/``smull``) → int32 convolution (register tile) → requantize
    or dequantize."""
    acc = channel_layout_sum(packed_input(data, conv, g, "int8"), kernel, conv, g, LANES)
    return output_stage(acc, bias, multiplier, float_bias, conv, g, LANES)


# ---- the tensor intrinsics ---------------------------------------------------------------------


def _pair_products(pixel: Any, weights: Any, first_channel: int) -> Any:
    """Half of the widening step: the pixel's 4 bytes times the 4 weights of output channels
    ``first_channel`` and ``first_channel + 1`` (8 int16 products, exact, ``smull``), adjacent
    pairs summed into 4 int32 (``saddlp``). An expression the TVMScript body splices in, not a
    named temporary (TVM would serve that from the heap at every tile)."""
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id(_SADDLP),
        T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(_SMULL),
            T.reinterpret(
                T.broadcast(T.reinterpret(pixel.vload([0], "int8x4"), dtype="int32"), 2),
                dtype="int8x8",
            ),
            weights.vload([first_channel, 0], dtype="int8x8"),
            dtype="int16x8",
        ),
        dtype="int32x4",
    )


@functools.cache
def _register_dot_intrinsic(dotprod: bool) -> str:
    """Register the 4 × 4 s8·s8 → s32 dot product step (once per process): one ``sdot`` with
    the dot-product extension, else ``smull``/``saddlp``/``addp`` (plain Armv8.0 NEON, exact)."""
    name = "detc_dot_4x4_i8i8i32_" + ("sdot" if dotprod else "neon")

    @T.prim_func(s_tir=True)
    def description(
        a: T.Buffer((4,), "int8", offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((4, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((4,), "int32", offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def sdot(
        a: T.Buffer((4,), "int8", offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((4, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((4,), "int32", offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            # No named temporaries: TVM would serve each from the heap at every tile (see
            # detc.kernels.conv2d_int8).
            c[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(_SDOT),
                c.vload([0], dtype="int32x4"),
                T.reinterpret(
                    T.broadcast(T.reinterpret(a.vload([0], "int8x4"), dtype="int32"), 4),
                    dtype="int8x16",
                ),
                b.vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            )

    @T.prim_func(s_tir=True)
    def widening(
        a: T.Buffer((4,), "int8", offset_factor=1),  # type: ignore[valid-type]
        b: T.Buffer((4, 4), "int8", offset_factor=1),  # type: ignore[valid-type]
        c: T.Buffer((4,), "int32", offset_factor=1),  # type: ignore[valid-type]
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            # Products of channels 0-1 and 2-3 (int16, exact), summed pairwise into int32 twice.
            # One expression, no named temporaries: TVM would serve each from the heap at every
            # tile (see detc.kernels.conv2d_int8); LLVM merges the repeated pixel broadcast.
            c[T.ramp(T.int32(0), 1, 4)] = c.vload([0], dtype="int32x4") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(_ADDP),
                _pair_products(a, b, 0),
                _pair_products(a, b, 2),
                dtype="int32x4",
            )

    tvm.s_tir.TensorIntrin.register(name, description, sdot if dotprod else widening, override=True)
    return name


# ---- the schedule ------------------------------------------------------------------------------


def _schedule_conv2d_int8(
    func: tvm.tirx.PrimFunc, isa: ArmInt8Isa, g: Geometry
) -> tvm.tirx.PrimFunc:
    """The shared int8 schedule with every step tensorized (``sdot``, or widening NEON
    multiplies without dotprod)."""

    def reduce_step(sch: tvm.s_tir.Schedule, conv: Any, icb: Any, oc: Any, _ic: Any) -> None:
        init = sch.decompose_reduction(conv, icb)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(oc, _register_dot_intrinsic(isa.dotprod))

    return schedule_conv2d_int8_tile(func, g, isa.name, reduce_step)


# ---- one call for the Relax lowering -----------------------------------------------------------


def build_conv2d_int8_arm(
    data_shape: tuple[int, ...], conv: QuantizedConv2d, target: tvm.target.Target
) -> Int8Kernel:
    """The scheduled aarch64 function ``(data, *constants) -> output`` for ``target``.

    Constants: packed kernel, folded int32 bias, requant multiplier[, float bias], as the x86
    kernel. Marked ``tirx.is_scheduled`` (the tuner leaves it alone) and opaque to FuseOps.
    """
    isa = arm_int8_isa(target)
    geometry = _geometry(tuple(int(d) for d in data_shape), conv)
    packed_weight = pack_weight(conv.weight, LANES)
    bias = _pad_channels(folded_bias_signed(conv), LANES)
    multiplier = _pad_channels(conv.kernel_multiplier(), LANES)
    constants = [packed_weight, bias, multiplier]
    data = te.placeholder(tuple(data_shape), conv.input_dtype, name="data")
    kernel = te.placeholder(packed_weight.shape, "int8", name="kernel")
    bias_t = te.placeholder(bias.shape, "int32", name="bias")
    multiplier_t = te.placeholder(multiplier.shape, "float32", name="multiplier")
    inputs = [data, kernel, bias_t, multiplier_t]
    float_bias_t = None
    if conv.float_bias is not None:
        if not conv.float_output:
            raise ValueError("a float bias needs a float32 output (quantize it for 8-bit)")
        constants.append(_pad_channels(conv.float_bias.astype(np.float32), LANES))
        float_bias_t = te.placeholder(constants[-1].shape, "float32", name="float_bias")
        inputs.append(float_bias_t)
    out = _conv2d_int8_compute(data, kernel, bias_t, multiplier_t, float_bias_t, conv, geometry)
    func = te.create_prim_func([*inputs, out])
    func = _schedule_conv2d_int8(func, isa, geometry)
    func = (
        func.without_attr("global_symbol")
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", OPAQUE_PATTERN)
    )
    return Int8Kernel(
        func=func,
        constants=tuple(constants),
        out_shape=(geometry.batch, geometry.out_channels, geometry.out_h, geometry.out_w),
        out_dtype=conv.output_dtype,
        isa=isa,
    )
