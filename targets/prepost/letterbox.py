"""Letterbox/resize, channel order and normalisation as TIR, for a uint8 HWC RGB image of any size.

The compiled preprocessing must give the tensor detc's Python path gives
(:func:`detc.compiler.detection.datasets.preprocess`), which resizes with Pillow's BILINEAR
filter. Pillow is not OpenCV's INTER_LINEAR: when it shrinks an axis it widens the triangle
filter by the shrink factor (an antialiasing filter over ``2 * scale`` source pixels), and it
resamples in two passes (horizontal, then vertical) with 22-bit fixed-point weights and a
rounding to uint8 between them (``libImaging/Resample.c``: ``precompute_coeffs``,
``normalize_coeffs_8bpc``, ``ImagingResampleHorizontal_8bpc``). These functions do the same
arithmetic, so the resized pixels are Pillow's exactly; the geometry (resized size, padding) is
:func:`~detc.compiler.detection.datasets.letterbox_geometry`'s, computed in float64 with
Python's round-half-to-even, YOLOv5's ``round(d - 0.1)`` border split included.

One PrimFunc, :func:`letterbox_func` ``image (h, w, 3) uint8 → tensor`` (the model input, NCHW
or NHWC, batch 1), ``h`` and ``w`` symbolic, in two passes: each input row resized to the new
width (into a buffer of its own, transposed), then the rows resized to the new height and placed
on a canvas of ``pad_value``, channels reordered, ``(x * scale - mean) / std`` in float32 as
numpy computes it. An axis whose size is kept is copied, as Pillow skips its pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from detc.compiler.detection.spec import ModelSpec

#: Pillow's fixed-point weights: 32 bits minus 8 for the pixel minus 2 for the sum's headroom
PRECISION_BITS = 22
#: TVM's OpPatternKind kOpaque: never fused with the operators around it
OPAQUE_PATTERN = 8


@dataclass(frozen=True)
class Preprocessing:
    """What the compiled preprocessing needs of a :class:`ModelSpec` (plain values, hashable)."""

    input_size: tuple[int, int]  # (H, W) of the model input
    letterbox: bool  # False: stretch to (H, W) ("resize")
    centre: bool  # letterbox border split on both sides (YOLOv5) rather than top-left (YOLOX)
    pad_value: float
    bgr: bool
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    nchw: bool
    dtype: str

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Preprocessing:
        return cls(
            input_size=(int(spec.input_size[0]), int(spec.input_size[1])),
            letterbox=spec.resize == "letterbox",
            centre=spec.pad_align == "center",
            pad_value=float(spec.pad_value),
            bgr=spec.channel_order == "BGR",
            scale=float(spec.scale),
            mean=tuple(float(m) for m in spec.mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in spec.std),  # type: ignore[arg-type]
            nchw=spec.layout == "NCHW",
            dtype=spec.dtype,
        )

    @property
    def tensor_shape(self) -> tuple[int, int, int, int]:
        height, width = self.input_size
        return (1, 3, height, width) if self.nchw else (1, height, width, 3)


def round_half_even(value: Any) -> Any:
    """Python's ``round`` of a float64 PrimExpr, as int64 (ties to the even neighbour)."""
    from tvm import tirx

    floor = tirx.floor(value)
    fraction = value - floor
    whole = tirx.Cast("int64", floor)
    up = tirx.Or(fraction > 0.5, tirx.And(fraction == 0.5, tirx.floormod(whole, 2) == 1))
    return tirx.Select(up, whole + 1, whole)


def placement(
    h: Any, w: Any, input_size: tuple[int, int], letterbox: bool, centre: bool
) -> tuple[Any, Any, Any, Any]:
    """``(new_h, new_w, top, left)`` of an ``h`` x ``w`` image as int64 PrimExprs, computed as
    :func:`~detc.compiler.detection.datasets.letterbox_geometry` does (float64, round half to
    even, YOLOv5's ``round(d - 0.1)`` split); the letterbox and the box mapping of detect.py
    both read it."""
    from tvm import tirx

    input_h, input_w = input_size
    if not letterbox:
        zero = tirx.IntImm("int64", 0)
        return tirx.IntImm("int64", input_h), tirx.IntImm("int64", input_w), zero, zero
    hf = tirx.Cast("float64", h)
    wf = tirx.Cast("float64", w)
    ratio = tirx.min(
        tirx.FloatImm("float64", float(input_h)) / hf, tirx.FloatImm("float64", float(input_w)) / wf
    )
    # at least one pixel (Pillow refuses a zero size; the Python path fails there)
    new_h = tirx.max(round_half_even(hf * ratio), tirx.IntImm("int64", 1))
    new_w = tirx.max(round_half_even(wf * ratio), tirx.IntImm("int64", 1))
    if not centre:
        zero = tirx.IntImm("int64", 0)
        return new_h, new_w, zero, zero

    def border(size: int, new: Any) -> Any:
        half = tirx.Cast("float64", tirx.IntImm("int64", size) - new) / tirx.FloatImm(
            "float64", 2.0
        )
        return round_half_even(half - tirx.FloatImm("float64", 0.1))

    return new_h, new_w, border(input_h, new_h), border(input_w, new_w)


def letterbox_func(prep: Preprocessing) -> Any:
    """The PrimFunc ``(image (h, w, 3) uint8, tensor)``: see the module doc."""
    from tvm.script import tirx as T

    input_h, input_w = prep.input_size
    letterbox, centre = prep.letterbox, prep.centre
    one = 1 << PRECISION_BITS
    half_one = 1 << (PRECISION_BITS - 1)
    tensor_shape = tuple(T.int64(d) for d in prep.tensor_shape)
    out_dtype = prep.dtype
    scale_value = prep.scale
    pad = prep.pad_value
    mean, std = prep.mean, prep.std
    nchw, bgr = prep.nchw, prep.bgr

    @T.prim_func(private=True)
    def letterbox_image(var_image: T.handle, var_tensor: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE_PATTERN})
        h = T.int64()
        w = T.int64()
        image = T.match_buffer(var_image, (h, w, T.int64(3)), "uint8")
        tensor = T.match_buffer(var_tensor, tensor_shape, out_dtype)
        # the rows resized to the new width, transposed (the vertical pass reads its taps
        # contiguously); allocated here, not by the caller: a Relax tensor of a size computed
        # from h would need a VM shape function, and a module holding one loses the parallel
        # compute scopes of every kernel in TVM 0.27's LLVM codegen (the network ran 2x slower)
        columns = T.alloc_buffer((T.int64(input_w), h, T.int64(3)), "int32")
        new_h, new_w, top, left = placement(h, w, (input_h, input_w), letterbox, centre)
        x_scale = T.Cast("float64", w) / T.Cast("float64", new_w)
        x_filterscale = T.max(x_scale, T.float64(1.0))
        x_inverse = T.float64(1.0) / x_filterscale
        if new_w == w:
            # the width is kept: Pillow does not resample it (its weights would be 1 and 0)
            for x in T.parallel(w):
                for y, c in T.grid(h, T.int64(3)):
                    columns[x, y, c] = T.Cast("int32", image[y, x, c])
        else:
            for x in T.parallel(new_w):
                center = (T.Cast("float64", x) + T.float64(0.5)) * x_scale
                first = T.max(T.Cast("int64", center - x_filterscale + T.float64(0.5)), T.int64(0))
                taps = T.min(T.Cast("int64", center + x_filterscale + T.float64(0.5)), w) - first
                total = T.decl_buffer((1,), "float64", scope="local")
                total[0] = T.float64(0.0)
                for t in T.serial(taps):
                    distance = T.fabs(
                        (T.Cast("float64", t + first) - center + T.float64(0.5)) * x_inverse
                    )
                    total[0] = total[0] + T.Select(
                        distance < T.float64(1.0), T.float64(1.0) - distance, T.float64(0.0)
                    )
                for y, c in T.grid(h, T.int64(3)):
                    columns[x, y, c] = half_one
                for t in T.serial(taps):
                    distance = T.fabs(
                        (T.Cast("float64", t + first) - center + T.float64(0.5)) * x_inverse
                    )
                    weight = T.Select(
                        distance < T.float64(1.0), T.float64(1.0) - distance, T.float64(0.0)
                    )
                    fixed = T.Cast(
                        "int32", T.float64(0.5) + weight / total[0] * T.float64(float(one))
                    )
                    for y, c in T.grid(h, T.int64(3)):
                        columns[x, y, c] = (
                            columns[x, y, c] + T.Cast("int32", image[y, first + t, c]) * fixed
                        )
                for y, c in T.grid(h, T.int64(3)):
                    columns[x, y, c] = T.max(
                        T.min(T.shift_right(columns[x, y, c], PRECISION_BITS), 255), 0
                    )
        scale = T.Cast("float64", h) / T.Cast("float64", new_h)
        filterscale = T.max(scale, T.float64(1.0))
        inverse = T.float64(1.0) / filterscale
        for y in T.parallel(T.int64(input_h)):
            inside_y = T.And(y >= top, y < top + new_h)
            center = (T.Cast("float64", y - top) + T.float64(0.5)) * scale
            first = T.max(T.Cast("int64", center - filterscale + T.float64(0.5)), T.int64(0))
            taps = T.Select(
                inside_y,
                T.min(T.Cast("int64", center + filterscale + T.float64(0.5)), h) - first,
                T.int64(0),
            )
            # this output row of the resized image, x-major (its weights are the same for every
            # pixel of the row: computed once per tap)
            row = T.decl_buffer((T.int64(input_w * 3),), "int32", scope="local")
            if inside_y:
                if new_h == h:
                    # the height is kept: Pillow does not resample it
                    for x, c in T.grid(new_w, T.int64(3)):
                        row[x * T.int64(3) + c] = columns[x, y - top, c]
                else:
                    total = T.decl_buffer((1,), "float64", scope="local")
                    total[0] = T.float64(0.0)
                    for t in T.serial(taps):
                        distance = T.fabs(
                            (T.Cast("float64", t + first) - center + T.float64(0.5)) * inverse
                        )
                        total[0] = total[0] + T.Select(
                            distance < T.float64(1.0), T.float64(1.0) - distance, T.float64(0.0)
                        )
                    for x, c in T.grid(new_w, T.int64(3)):
                        row[x * T.int64(3) + c] = half_one
                    for t in T.serial(taps):
                        distance = T.fabs(
                            (T.Cast("float64", t + first) - center + T.float64(0.5)) * inverse
                        )
                        weight = T.Select(
                            distance < T.float64(1.0), T.float64(1.0) - distance, T.float64(0.0)
                        )
                        fixed = T.Cast(
                            "int32", T.float64(0.5) + weight / total[0] * T.float64(float(one))
                        )
                        for x, c in T.grid(new_w, T.int64(3)):
                            row[x * T.int64(3) + c] = (
                                row[x * T.int64(3) + c] + columns[x, first + t, c] * fixed
                            )
                    for x, c in T.grid(new_w, T.int64(3)):
                        row[x * T.int64(3) + c] = T.max(
                            T.min(T.shift_right(row[x * T.int64(3) + c], PRECISION_BITS), 255), 0
                        )
            for x, c in T.grid(T.int64(input_w), T.int64(3)):
                inside = T.And(inside_y, T.And(x >= left, x < left + new_w))
                value = T.Select(
                    inside,
                    T.Cast("float32", row[T.max(x - left, T.int64(0)) * T.int64(3) + c]),
                    T.float32(pad),
                )
                # Python flips the channels, then normalises: output channel ``channel``
                # holds source channel c and takes mean[channel], std[channel]
                channel = T.int64(2) - c if bgr else c
                normalised = (
                    value * T.float32(scale_value)
                    - T.Select(
                        channel == 0,
                        T.float32(mean[0]),
                        T.Select(channel == 1, T.float32(mean[1]), T.float32(mean[2])),
                    )
                ) / T.Select(
                    channel == 0,
                    T.float32(std[0]),
                    T.Select(channel == 1, T.float32(std[1]), T.float32(std[2])),
                )
                if nchw:
                    tensor[0, channel, y, x] = T.Cast(out_dtype, normalised)
                else:
                    tensor[0, y, x, channel] = T.Cast(out_dtype, normalised)

    return letterbox_image
