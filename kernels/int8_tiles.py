"""The int8 convolution's schedule knobs and how to measure them per workload.

:func:`~detc.kernels.conv2d_int8.build_conv2d_int8` takes ``tiles``: the accumulator layout
(``channels``: a vector is 16 output channels of one pixel; ``pixels``: 16 neighbouring pixels of
one channel, stride-1 convolutions only) and the register tile (``oc_tile`` × ``ow_tile``). Every
choice computes the same numbers bit for bit; only the speed differs, and which one wins depends on
the workload (a 1×1 convolution with a wide image wants pixels, a strided one can only have
channels) and on the CPU. So a tuned build measures a small grid per workload
(:func:`candidate_tiles`, :func:`measure_tiles`); :mod:`detc.targets.tuning.tiles` records the
winner in the tuning database directory, keyed by :func:`workload_key` and target. An untuned
build, or a workload never measured, gets :func:`~detc.kernels.conv2d_int8.default_tiles`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable

import numpy as np
import tvm

from detc.kernels.conv2d_int8 import (
    CHANNELS,
    PIXELS,
    QuantizedConv2d,
    Tiles,
    build_conv2d_int8,
    default_tiles,
    flattens_pixels,
    int8_isa,
    pixel_layout_applies,
    plan_geometry,
)

#: (channel blocks, pixels) register tiles of the channel layout; 2 × 10 was the old default
_CHANNEL_TILES = ((2, 10), (2, 7), (1, 15), (1, 20), (4, 5), (4, 6), (8, 3), (2, 12))
#: (channels, pixel vectors) register tiles of the pixel layout, mostly at most 15
#: accumulators (a tile under 1 KiB lives on the stack: TVM serves a larger one from the heap
#: at every tile)
_PIXEL_TILES = ((3, 5), (4, 2), (4, 3), (7, 2), (2, 7), (5, 3), (6, 2), (8, 2), (6, 3))
#: measuring rounds per candidate (interleaved; the median counts)
ROUNDS = 5
#: seconds one timed sample should last
SAMPLE_SECONDS = 0.01

#: ``(data_shape, conv, target) -> tiles`` as the lowering asks for a schedule
TileChooser = Callable[[tuple[int, ...], QuantizedConv2d, tvm.target.Target], Tiles | None]


def workload_key(data_shape: tuple[int, ...], conv: QuantizedConv2d) -> str:
    """What the kernel's speed depends on (shapes, strides, dtypes, epilogue), not the
    weights' values: two convolutions with the same key share their measured tile."""
    described = {
        "data": list(data_shape),
        "weight": list(conv.weight.shape),
        "strides": list(conv.strides),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
        "input": conv.input_dtype,
        "output": conv.output_dtype,
        "relu": conv.relu,
        "activation": conv.activation,
        "bias": conv.bias is not None,
        "float_bias": conv.float_bias is not None,
    }
    canonical = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def candidate_tiles(
    data_shape: tuple[int, ...], conv: QuantizedConv2d, target: tvm.target.Target
) -> list[Tiles]:
    """The grid one workload is measured on: the default first, then every valid tile of
    :data:`_CHANNEL_TILES` and (stride-1 width) :data:`_PIXEL_TILES`."""
    isa = int8_isa(target)
    grid: list[Tiles] = [default_tiles(data_shape, conv, isa)]
    grid += [{"layout": CHANNELS, "oc_tile": c, "ow_tile": w} for c, w in _CHANNEL_TILES]
    if pixel_layout_applies(conv, isa):
        grid += [
            {"layout": PIXELS, "oc_tile": c, "ow_tile": v * isa.lanes} for c, v in _PIXEL_TILES
        ]
    valid: list[Tiles] = []
    for tiles in grid:
        shape = data_shape
        if tiles.get("layout") == PIXELS and flattens_pixels(conv):
            shape = (data_shape[0], data_shape[1], 1, data_shape[2] * data_shape[3])
        try:
            plan_geometry(shape, conv, isa, tiles)
        except ValueError:
            continue
        if tiles not in valid:
            valid.append(tiles)
    return valid


def measure_tiles(
    data_shape: tuple[int, ...],
    conv: QuantizedConv2d,
    target: tvm.target.Target,
    candidates: list[Tiles],
    rounds: int = ROUNDS,
    *,
    device: tvm.runtime.Device,
) -> list[tuple[Tiles, float]]:
    """Median seconds of each candidate on ``device`` (the caller's target's, e.g.
    ``tvm.cpu(0)``; random data; rounds interleaved so that a drift of the machine's speed hits
    every candidate alike), fastest first."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, data_shape).astype(conv.input_dtype)
    timers = []
    for tiles in candidates:
        kernel = build_conv2d_int8(data_shape, conv, target, tiles)
        module = tvm.IRModule({"main": kernel.func.with_attr("global_symbol", "main")})
        executable = tvm.compile(module, target=target)
        runtime_module = getattr(executable, "mod", executable)
        shaped = data.reshape(kernel.func_data_shape or data_shape)
        arrays = [tvm.runtime.tensor(shaped, device)]
        arrays += [tvm.runtime.tensor(c, device) for c in kernel.constants]
        out_shape = kernel.func_out_shape or kernel.out_shape
        arrays.append(tvm.runtime.tensor(np.zeros(out_shape, kernel.out_dtype), device))
        once = runtime_module.time_evaluator("main", device, number=1, repeat=1)(*arrays).mean
        number = max(1, int(SAMPLE_SECONDS / max(once, 1e-7)))
        timer = runtime_module.time_evaluator("main", device, number=number, repeat=1)
        timers.append((timer, arrays))
    samples: list[list[float]] = [[] for _ in candidates]
    for _ in range(rounds):
        for (timer, arrays), times in zip(timers, samples, strict=True):
            times.append(float(timer(*arrays).mean))
    measured = [(t, statistics.median(s)) for t, s in zip(candidates, samples, strict=True)]
    return sorted(measured, key=lambda pair: pair[1])


def describe(data_shape: tuple[int, ...], conv: QuantizedConv2d) -> str:
    """``16x160x160->16 k1 s1`` (logs and benchmarks)."""
    out_channels, in_channels, kernel_h, _ = conv.weight.shape
    return (
        f"{in_channels}x{data_shape[2]}x{data_shape[3]}->{out_channels} "
        f"k{kernel_h} s{conv.strides[0]}"
    )
