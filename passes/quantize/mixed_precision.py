"""Which layers int8 quantization hurts, and mixed precision that keeps those in float.

:func:`layer_sensitivity` calibrates once, then quantizes one layer at a time (everything else
float) and measures what that layer alone does to the graph outputs on a few calibration images
(SQNR and cosine: cheap) and, given a COCO dataset and a decoder, to the mAP (the existing
evaluation: :func:`detc.compiler.detection.report.evaluate_detection`).

:func:`mixed_precision` starts from the fully quantized model and, if its measured mAP drop is
over budget, keeps the most sensitive layers in float — ranked by those measurements, never by
a list of layer names — growing their number 1, 2, 4, ... until the drop fits, then bisecting
for the fewest. Each trial is a real mAP measurement of the model it returns.

The quantized models are QDQ ONNX from :mod:`detc.passes.quantize.qdq`, run by onnxruntime.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnx

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import write_file_atomically
from detc.compiler.reference import ort_session, run_session
from detc.passes.calibration import Feeds
from detc.passes.quantize.calibrate import Calibration, CalibrationSource
from detc.passes.quantize.qdq import QuantLayer

#: an SQNR of an exact channel (no noise) counts as this in averages
_CAP_DB = 200.0

#: percentile calibration on 32 images of ``calib`` (which a caller must then give)
DEFAULT_CALIBRATION = Calibration()

ModelSource: TypeAlias = CalibrationSource


def sqnr_db(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio in dB over all given arrays (inf when identical)."""
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    noise = sum(
        float(np.sum((r.astype(np.float64) - c.astype(np.float64)) ** 2))
        for r, c in zip(reference, candidate, strict=True)
    )
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def channel_axis(shape: Sequence[int]) -> int | None:
    """The axis of an output's channels: the shortest one after the batch axis (yolov5's 85 of
    (1, 25200, 85), yolov8's 84 of (1, 84, 8400)); None for outputs of rank < 2."""
    if len(shape) < 2:
        return None
    return min(range(1, len(shape)), key=lambda axis: (shape[axis] < 2, shape[axis]))


def channel_sqnr_db(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """The mean over output channels of each channel's SQNR (dB; channels along
    :func:`channel_axis`). Every channel counts the same, so a detector's class scores (0..1)
    are not drowned by its box coordinates (hundreds of pixels), as in :func:`sqnr_db`."""
    values: list[float] = []
    for r, c in zip(reference, candidate, strict=True):
        axis = channel_axis(r.shape)
        ref = r.astype(np.float64)
        ref = (
            ref.reshape(1, -1)
            if axis is None
            else np.moveaxis(ref, axis, 0).reshape(r.shape[axis], -1)
        )
        cand = c.astype(np.float64)
        cand = (
            cand.reshape(1, -1)
            if axis is None
            else np.moveaxis(cand, axis, 0).reshape(c.shape[axis], -1)
        )
        signal = (ref**2).sum(axis=1)
        noise = ((ref - cand) ** 2).sum(axis=1)
        for s, n in zip(signal, noise, strict=True):
            values.append(_CAP_DB if n == 0 else min(10 * math.log10(max(s, 1e-300) / n), _CAP_DB))
    return float(np.mean(values)) if values else _CAP_DB


def cosine(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Cosine similarity of all given arrays, flattened and concatenated."""
    a = np.concatenate([r.astype(np.float64).ravel() for r in reference])
    b = np.concatenate([c.astype(np.float64).ravel() for c in candidate])
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norms) if norms else 1.0


# --- measurements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSensitivity:
    """What quantizing one layer alone (everything else float) does to the model."""

    name: str
    op_type: str
    macs: int
    mac_share: float  # of the quantizable layers' MACs, 0..1
    sqnr_db: float  # graph outputs vs float, on the probe images
    cosine: float
    map_delta: float | None = None  # mAP points (x100), this layer alone int8 minus float
    channel_sqnr_db: float | None = None  # mean of the output channels' SQNRs

    def describe(self) -> str:
        alone = "" if self.map_delta is None else f", mAP {self.map_delta:+.2f} points alone"
        return f"output SQNR {self.sqnr_db:.1f} dB alone{alone}"

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class SensitivityReport:
    """Per-layer sensitivity, most sensitive first (by ``rank_by``)."""

    method: str
    calib_images: int
    probe_images: int
    rank_by: str
    layers: list[LayerSensitivity] = field(default_factory=list)
    all_int8_sqnr_db: float | None = None  # every layer quantized
    float_map: float | None = None
    all_int8_map: float | None = None
    map_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "calib_images": self.calib_images,
            "probe_images": self.probe_images,
            "rank_by": self.rank_by,
            "all_int8_sqnr_db": self.all_int8_sqnr_db,
            "float_map": self.float_map,
            "all_int8_map": self.all_int8_map,
            "map_images": self.map_images,
            "layers": [s.to_dict() for s in self.layers],
        }

    def table(self) -> str:
        def points(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.2f}"

        head = (
            f"int8 sensitivity, one layer quantized at a time ({self.method} ranges on "
            f"{self.calib_images} images; SQNR/cosine of the outputs on {self.probe_images}"
        )
        if self.float_map is not None:
            head += f"; mAP@[.5:.95] on {self.map_images} images"
        head += f"); ranked by {self.rank_by}"
        lines = [head]
        if self.all_int8_sqnr_db is not None:
            lines.append(
                f"all layers int8: output SQNR {self.all_int8_sqnr_db:.1f} dB, mAP "
                f"{points(self.all_int8_map)} (float {points(self.float_map)})"
            )
        lines.append(
            f"{'#':>3} {'layer':<44} {'op':<7} {'MACs':>6} {'SQNR dB':>8} {'ch. SQNR':>8} "
            f"{'cosine':>9} {'mAP delta':>9}"
        )
        for rank, s in enumerate(self.layers, start=1):
            delta = "-" if s.map_delta is None else f"{s.map_delta:+.2f}"
            channels = "-" if s.channel_sqnr_db is None else f"{s.channel_sqnr_db:.1f}"
            lines.append(
                f"{rank:>3} {s.name[-44:]:<44} {s.op_type:<7} {100 * s.mac_share:>5.1f}% "
                f"{s.sqnr_db:>8.1f} {channels:>8} {s.cosine:>9.6f} {delta:>9}"
            )
        return "\n".join(lines)


def rank_layers(layers: Sequence[LayerSensitivity], rank_by: str) -> list[LayerSensitivity]:
    """Most sensitive first: lowest SQNR, or largest mAP loss (SQNR breaks ties)."""
    if rank_by == "map":
        if any(s.map_delta is None for s in layers):
            raise BadInputError("rank_by=map needs the per-layer mAP: give a COCO dataset")
        return sorted(layers, key=lambda s: (s.map_delta, s.sqnr_db))
    if rank_by != "sqnr":
        raise BadInputError(f"rank_by={rank_by!r}: choose sqnr or map")
    return sorted(layers, key=lambda s: s.sqnr_db)


Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class MapMeter:
    """COCO mAP@[.5:.95] of a model run by onnxruntime on a dataset (the existing evaluation)."""

    def __init__(
        self,
        data: str | os.PathLike[str],
        model: onnx.ModelProto,
        *,
        decoder: str | None = None,
        spec_path: str | os.PathLike[str] | None = None,
        max_images: int | None = None,
        threads: int = 0,
    ) -> None:
        from detc.compiler.detection.datasets import CocoDataset
        from detc.compiler.detection.spec import spec_for_model

        spec = spec_for_model(model, spec_path)
        if decoder is not None:
            spec = spec.with_overrides(decoder=decoder)
        if not spec.decoder:
            raise BadInputError(
                "mAP needs a decoder and none could be inferred from the model: give one "
                "(yolov5, yolov8, yolox, demo or module:function)"
            )
        self.spec = spec
        self.dataset = CocoDataset(Path(data), spec)
        self.max_images = max_images
        self.threads = threads
        self.images = (
            len(self.dataset) if max_images is None else min(max_images, len(self.dataset))
        )

    def __call__(self, model: onnx.ModelProto) -> float:
        from detc.compiler.detection.report import evaluate_detection

        session = ort_session(model, threads=self.threads)
        report = evaluate_detection(
            lambda feeds: run_session(session, feeds),
            None,
            self.dataset,
            self.spec,
            max_images=self.max_images,
            progress=False,
        )
        return report.reference.metrics.map


def _outputs(model: onnx.ModelProto, feeds: Sequence[Feeds], threads: int) -> list[np.ndarray]:
    """Each graph output over all ``feeds``, stacked on a new leading axis."""
    session = ort_session(model, threads=threads)
    names = [o.name for o in session.get_outputs()]
    runs = [run_session(session, feed) for feed in feeds]
    return [np.stack([run[name] for run in runs]) for name in names]


def layer_sensitivity(
    model: ModelSource,
    calibration: Calibration = DEFAULT_CALIBRATION,
    data: str | os.PathLike[str] | None = None,
    decoder: str | None = None,
    *,
    probe_images: int = 8,
    max_images: int | None = None,
    rank_by: str | None = None,
    spec_path: str | os.PathLike[str] | None = None,
    threads: int = 0,
    on_layer: Callable[[LayerSensitivity], None] | None = None,
) -> SensitivityReport:
    """Quantize each quantizable layer alone and measure what it does to the outputs (and mAP).

    ``model`` is a path, an ``onnx_ir`` or ``onnx`` model (calibrated here as ``calibration``
    says) or a :class:`CalibratedModel`. SQNR and cosine compare
    the graph outputs with the float model's on the first ``probe_images`` calibration images.
    With ``data`` (a COCO dataset) each layer's mAP change is measured too, on ``max_images``
    of it (all by default) with ``decoder`` (default: the model spec's). ``rank_by`` is
    ``sqnr`` unless ``map`` is asked for: one layer's mAP change on a small dataset is mostly
    noise (yolov5n, 64 coco images: -0.6 to +0.9 points, single layers "improving" the model).
    """
    calibrated = calibration.apply(model, spec_path)
    probes = calibrated.feeds[:probe_images]
    reference = _outputs(calibrated.proto, probes, threads)
    meter = None
    report = SensitivityReport(
        calibrated.method,
        len(calibrated.feeds),
        len(probes),
        rank_by or "sqnr",
    )
    full = calibrated.quantize()
    report.all_int8_sqnr_db = sqnr_db(reference, _outputs(full, probes, threads))
    if data is not None:
        meter = MapMeter(
            data,
            calibrated.proto,
            decoder=decoder,
            spec_path=spec_path,
            max_images=max_images,
            threads=threads,
        )
        report.map_images = meter.images
        report.float_map = meter(calibrated.proto)
        report.all_int8_map = meter(full)
    total = sum(q.macs for q in calibrated.layers)
    measured = []
    for layer in calibrated.layers:
        alone = calibrated.quantize([layer.name])
        outputs = _outputs(alone, probes, threads)
        delta = None
        if meter is not None and report.float_map is not None:
            delta = 100.0 * (meter(alone) - report.float_map)
        found = LayerSensitivity(
            layer.name,
            layer.op_type,
            layer.macs,
            layer.macs / total if total else 0.0,
            sqnr_db(reference, outputs),
            cosine(reference, outputs),
            delta,
            channel_sqnr_db(reference, outputs),
        )
        measured.append(found)
        if on_layer is not None:
            on_layer(found)
    report.layers = rank_layers(measured, report.rank_by)
    return report


# --- mixed precision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    kept_float: int  # how many of the most sensitive layers stayed float
    map: float


@dataclass
class MixedPrecisionResult:
    """The returned model, the layers it keeps in float (most sensitive first), the evidence."""

    model: onnx.ModelProto
    kept_float: list[LayerSensitivity]
    float_map: float
    fully_quantized_map: float
    map: float
    max_map_drop: float  # points
    trials: list[Trial] = field(default_factory=list)
    sensitivity: SensitivityReport | None = None

    @property
    def map_drop(self) -> float:
        """Points of mAP@[.5:.95] lost against the float model."""
        return 100.0 * (self.float_map - self.map)

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_map": self.float_map,
            "fully_quantized_map": self.fully_quantized_map,
            "map": self.map,
            "map_drop_points": round(self.map_drop, 3),
            "max_map_drop": self.max_map_drop,
            "kept_float": [s.to_dict() for s in self.kept_float],
            "trials": [vars(t) for t in self.trials],
        }

    def table(self) -> str:
        lines = [
            f"mixed precision: mAP {100 * self.float_map:.2f} float, "
            f"{100 * self.fully_quantized_map:.2f} all int8, {100 * self.map:.2f} returned "
            f"(drop {self.map_drop:.2f} <= {self.max_map_drop} points) with "
            f"{len(self.kept_float)} layers in float"
        ]
        for s in self.kept_float:
            lines.append(f"  {s.name[-48:]:<48} {s.describe()}")
        trials = ", ".join(f"{t.kept_float} float: {100 * t.map:.2f}" for t in self.trials)
        lines.append(f"  trials (layers in float: mAP): {trials}")
        return "\n".join(lines)


def mixed_precision(
    model: ModelSource,
    calibration: Calibration = DEFAULT_CALIBRATION,
    *,
    data: str | os.PathLike[str],
    max_map_drop: float,
    decoder: str | None = None,
    rank_by: str = "sqnr",
    sensitivity: SensitivityReport | None = None,
    probe_images: int = 8,
    max_images: int | None = None,
    spec_path: str | os.PathLike[str] | None = None,
    threads: int = 0,
) -> MixedPrecisionResult:
    """The quantized model with the fewest most-sensitive layers in float whose mAP drop fits.

    ``max_map_drop`` is in points of mAP@[.5:.95] (x100) on ``data``, against the float model
    on the same images. Layers are ranked by ``sensitivity`` (measured here when not given;
    ``rank_by=map`` measures each layer's own mAP change, one evaluation per layer, ``sqnr``
    only its output SQNR). Trials keep the top 1, 2, 4, ... layers in float until the budget
    holds, then bisect between the last two counts: the mAP is treated as improving with each
    layer returned to float, which the measurements only approximate.
    """
    calibrated = calibration.apply(model, spec_path)
    meter = MapMeter(
        data,
        calibrated.proto,
        decoder=decoder,
        spec_path=spec_path,
        max_images=max_images,
        threads=threads,
    )
    float_map = meter(calibrated.proto)
    names = [q.name for q in calibrated.layers]

    def fits(value: float) -> bool:
        return 100.0 * (float_map - value) <= max_map_drop + 1e-9

    full = calibrated.quantize(names)
    full_map = meter(full)
    trials = [Trial(0, full_map)]
    if fits(full_map):
        return MixedPrecisionResult(
            full, [], float_map, full_map, full_map, max_map_drop, trials, sensitivity
        )
    if sensitivity is None:
        sensitivity = layer_sensitivity(
            calibrated,
            calibration,
            data=data if rank_by == "map" else None,
            decoder=decoder,
            probe_images=probe_images,
            max_images=max_images,
            spec_path=spec_path,
            rank_by=rank_by,
            threads=threads,
        )
    ranked = rank_layers([s for s in sensitivity.layers if s.name in set(names)], rank_by)
    models: dict[int, tuple[onnx.ModelProto, float]] = {0: (full, full_map)}

    def trial(count: int) -> float:
        if count not in models:
            floats = {s.name for s in ranked[:count]}
            candidate = calibrated.quantize([n for n in names if n not in floats])
            models[count] = (candidate, meter(candidate))
            trials.append(Trial(count, models[count][1]))
        return models[count][1]

    failing, passing = 0, len(ranked)
    count = 1
    while count < len(ranked):
        if fits(trial(count)):
            passing = count
            break
        failing = count
        count *= 2
    if passing == len(ranked):
        models[passing] = (
            calibrated.quantize([n for n in names if n not in {s.name for s in ranked}]),
            float_map,
        )
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if fits(trial(middle)):
            passing = middle
        else:
            failing = middle
    chosen, chosen_map = models[passing]
    return MixedPrecisionResult(
        chosen,
        ranked[:passing],
        float_map,
        full_map,
        chosen_map,
        max_map_drop,
        trials,
        sensitivity,
    )


# --- plot ---------------------------------------------------------------------------------------


def write_sensitivity_plot(report: SensitivityReport, path: str | os.PathLike[str]) -> Path:
    """Per-layer output SQNR (and mAP change) in ranking order, as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = Path(path)
    layers = report.layers
    with_map = any(s.map_delta is not None for s in layers)
    height = max(3.0, 0.22 * len(layers) + 1.5)
    figure, axes = plt.subplots(
        1, 2 if with_map else 1, figsize=(12 if with_map else 7, height), squeeze=False
    )
    labels = [s.name[-40:] for s in layers]
    positions = np.arange(len(layers))
    sqnr_axis = axes[0][0]
    sqnr_axis.barh(positions, [min(s.sqnr_db, 99.0) for s in layers], color="C0")
    sqnr_axis.set_yticks(positions, labels, fontsize=7)
    sqnr_axis.invert_yaxis()
    sqnr_axis.set_xlabel("output SQNR with only this layer int8 (dB; lower = more sensitive)")
    if with_map:
        map_axis = axes[0][1]
        map_axis.barh(positions, [s.map_delta or 0.0 for s in layers], color="C3")
        map_axis.set_yticks(positions, [""] * len(layers))
        map_axis.invert_yaxis()
        map_axis.axvline(0.0, color="grey", linewidth=0.8)
        map_axis.set_xlabel("mAP@[.5:.95] change, this layer alone int8 (points)")
    figure.suptitle(f"int8 sensitivity ({report.method} ranges), ranked by {report.rank_by}")
    figure.tight_layout()
    try:
        write_file_atomically(target, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(figure)
    return target


__all__ = [
    "LayerSensitivity",
    "MapMeter",
    "MixedPrecisionResult",
    "QuantLayer",
    "SensitivityReport",
    "Trial",
    "cosine",
    "layer_sensitivity",
    "mixed_precision",
    "rank_layers",
    "sqnr_db",
    "write_sensitivity_plot",
]
