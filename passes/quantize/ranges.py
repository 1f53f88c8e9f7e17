"""Activation ranges of int8 calibration: onnxruntime's calibrators (minmax, percentile,
entropy) run on calibration images one at a time, and ``mse``: the clipping range whose 8-bit
grid errs least, searched on onnxruntime's histograms."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.compiler.progress import progress
from detc.compiler.reference import to_proto
from detc.passes.calibration import Feeds

METHODS = ("minmax", "percentile", "entropy", "mse")


#: levels of an 8-bit grid: KL compares the histogram with its quantized copy at this many levels
LEVELS = 256
_MSE_CANDIDATES = 200
_MSE_POINTS_PER_BIN = 8


class _FeedReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)


class _DropQuantizationChatter(logging.Filter):
    """onnxruntime.quantization warns on the root logger that the model was not pre-processed
    (its own optimizer would rewrite the graph we mean to keep): not a detc user's concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Silence onnxruntime.quantization's prints and root-logger warnings while it runs."""
    root = logging.getLogger()
    chatter = _DropQuantizationChatter()
    # logging.warning() would otherwise call basicConfig() and leave a handler on the root logger
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(chatter)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(chatter)
        if placeholder is not None:
            root.removeHandler(placeholder)


def activation_ranges(
    model: ir.Model | onnx.ModelProto,
    feeds: Sequence[Feeds],
    *,
    op_types: Sequence[str] = ("Conv", "Gemm", "MatMul"),
    method: str = "percentile",
    percentile: float = 99.999,
    bins: int = 2048,
    symmetric: bool = False,
    tensors: Collection[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Calibrated ``(low, high)`` of every float tensor that nodes of ``op_types`` read or write.

    onnxruntime's calibrator runs the model on each of ``feeds`` (one at a time). ``symmetric``
    says how the range will be used: percentile then cuts ``|x|``, mse fits a zero-centred grid.
    ``tensors`` limits the answer to those names (entropy's search is slow: ~1 s per tensor).
    """
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    if method not in METHODS:
        raise BadInputError(f"calibration method {method!r}: choose {', '.join(METHODS)}")
    if not feeds:
        raise BadInputError("calibration needs at least one input (no calibration images)")
    if method == "entropy" and bins < 4 * LEVELS:
        raise BadInputError(f"entropy calibration needs bins >= {4 * LEVELS}, got {bins}")
    kind = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
        "mse": CalibrationMethod.Entropy,  # the same histograms of values; mse picks the range
    }[method]
    extra: dict[str, Any] = {"symmetric": symmetric}
    if method != "minmax":
        extra.update(num_bins=bins, percentile=percentile)
        extra["num_quantized_bins"] = LEVELS
    with tempfile.TemporaryDirectory(prefix="detc-calib-") as tmp, quiet_onnxruntime():
        path = Path(tmp) / "model.onnx"
        onnx.save(to_proto(model), path)
        calibrator = create_calibrator(
            path,
            list(op_types),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=kind,
            extra_options=extra,
        )
        # one image per call: the histogram methods hold all they are given
        for feed in progress(feeds, f"quantize: {method} calibration", "image"):
            calibrator.collect_data(_FeedReader([feed]))

        def wanted(name: str) -> bool:
            return tensors is None or name in tensors

        if method in ("minmax", "percentile"):
            found = calibrator.compute_data()
            ranges = {
                name: _pair(found[name].range_value) for name in list(found.keys()) if wanted(name)
            }
        else:
            collector = calibrator.collector
            histograms = {k: h for k, h in collector.histogram_dict.items() if wanted(k)}
            if method == "entropy":
                ranges = {
                    name: _pair(collector.get_entropy_threshold(h, _window_levels(h, symmetric)))
                    for name, h in histograms.items()
                }
            else:
                ranges = {name: mse_range(h, symmetric=symmetric) for name, h in histograms.items()}
    return ranges


def _window_levels(histogram: Sequence[Any], symmetric: bool) -> int:
    """How many 8-bit levels fall in KL's zero-centred window ``[-t, t]``.

    onnxruntime's KL compares the histogram of values inside ``[-t, t]`` with its copy at a
    fixed number of levels. A symmetric int8 grid spans the window; an asymmetric uint8 one
    spans ``[min, t]`` only, so for non-negative data (after ReLU / SiLU) the window holds
    twice its 256 levels. With 128 levels everywhere (TensorRT's count, for ``|x|``) KL clipped
    yolov5n's activations by 5 mAP points' worth.
    """
    if symmetric:
        return LEVELS
    low, high = float(histogram[2]), float(histogram[3])
    bound = max(abs(low), abs(high), 1e-30)
    spanned = (bound - max(min(low, 0.0), -bound)) / (2 * bound)  # share of [-T, T] the grid covers
    return int(2 * round(LEVELS / max(spanned, 0.5) / 2))


def _pair(values: Sequence[Any]) -> tuple[float, float]:
    low, high = values[0], values[1]
    return float(np.min(low)), float(np.max(high))


def _quantize_dequantize(
    values: np.ndarray, low: np.ndarray, high: np.ndarray, symmetric: bool
) -> np.ndarray:
    """The 8-bit grid's reproduction of ``values`` (1-D) for each candidate range (rows)."""
    low = np.minimum(low, 0.0)[:, None]
    high = np.maximum(high, 0.0)[:, None]
    if symmetric:
        scale = np.maximum(np.maximum(-low, high), 1e-12) / 127.0
        codes = np.clip(np.round(values[None, :] / scale), -127, 127)
        return codes * scale
    scale = np.maximum(high - low, 1e-12) / 255.0
    zero = np.round(-low / scale)
    codes = np.clip(np.round(values[None, :] / scale) + zero, 0, 255)
    return (codes - zero) * scale


def mse_range(histogram: Sequence[Any], *, symmetric: bool = False) -> tuple[float, float]:
    """The range whose 8-bit grid reproduces a histogram with the least expected squared error.

    ``histogram`` is onnxruntime's ``(counts, edges, min, max, ...)``. Candidates shrink the
    observed range ``[min, max]`` toward zero; each is scored on points spread evenly through
    every bin (a bin's centre alone would misjudge grids whose step nears the bin width).
    """
    counts = np.asarray(histogram[0], dtype=np.float64)
    edges = np.asarray(histogram[1], dtype=np.float64)
    observed_low, observed_high = float(histogram[2]), float(histogram[3])
    used = counts > 0
    if not used.any() or observed_high <= observed_low:
        return observed_low, observed_high
    starts, widths = edges[:-1][used], np.diff(edges)[used]
    offsets = (np.arange(_MSE_POINTS_PER_BIN) + 0.5) / _MSE_POINTS_PER_BIN
    points = np.clip(starts[:, None] + widths[:, None] * offsets, observed_low, observed_high)
    weights = np.repeat(counts[used] / _MSE_POINTS_PER_BIN, _MSE_POINTS_PER_BIN)
    points = points.ravel()
    shrink = np.linspace(1.0 / _MSE_CANDIDATES, 1.0, _MSE_CANDIDATES)

    def best(lows: np.ndarray, highs: np.ndarray) -> int:
        errors = ((_quantize_dequantize(points, lows, highs, symmetric) - points) ** 2) @ weights
        return int(np.argmin(errors))

    if symmetric:
        bounds = shrink * max(abs(observed_low), abs(observed_high))
        bound = float(bounds[best(-bounds, bounds)])
        return max(-bound, observed_low), min(bound, observed_high)
    # the two ends clip different tails: search each with the other fixed, twice over
    low, high = min(observed_low, 0.0), max(observed_high, 0.0)
    for _ in range(2):
        highs = shrink * max(observed_high, 0.0)
        high = float(highs[best(np.full_like(highs, low), highs)])
        lows = shrink * min(observed_low, 0.0)
        low = float(lows[best(lows, np.full_like(lows, high))])
    return max(low, observed_low), min(high, observed_high)
