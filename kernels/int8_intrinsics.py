"""The tensor intrinsics of the x86 int8 kernel: one ``vpdpbusd`` per reduction step.

In the channel layout a step is the four bytes of one pixel (broadcast) times the ``L × 4``
weight bytes of ``L`` output channels; in the pixel layout it is ``L`` packed pixels times one
channel's four weight bytes (broadcast). Both accumulate into ``L`` int32 lanes (``L`` = 16 with
AVX512-VNNI, 8 with AVX-VNNI).
"""

from __future__ import annotations

import functools

import tvm
from tvm.script import tirx as T

from detc.kernels.int8_geometry import REDUCE_BLOCK

_INTRINSICS = {
    # lanes → (tensor intrinsic name, LLVM intrinsic)
    16: ("detc_dot_16x4_u8i8i32_vnni", "llvm.x86.avx512.vpdpbusd.512"),
    8: ("detc_dot_8x4_u8i8i32_vnni", "llvm.x86.avx512.vpdpbusd.256"),
}


@functools.cache
def register_dot_intrinsic(lanes: int) -> str:
    """Register the ``lanes × 4`` u8·s8 → s32 dot product (once per process).

    TVM ships a 16×4 VNNI intrinsic in ``tvm.s_tir.tensor_intrin.x86``, but importing that package
    parses every GPU intrinsic (~30-60 s here) and its ``vpdpbusd`` call uses the pre-LLVM-20
    signature (``<16 x i32>`` operands; LLVM 22 wants ``<64 x i8>``), so detc registers its own.
    The accumulator buffer is in the default scope: a ``local`` one became a per-tile heap
    allocation (see :mod:`detc.kernels.conv2d_int8`).
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
def register_pixel_dot_intrinsic(lanes: int) -> str:
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
