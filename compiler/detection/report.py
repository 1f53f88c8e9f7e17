"""Detection-level verification: run a reference and a candidate over a COCO set and compare.

For every image both runners get the same preprocessed input; their raw outputs are compared
tensor by tensor (worst case over images), decoded, mapped back to image pixels, scored against
the ground truth (COCO mAP) and matched box by box (`detc.compiler.detection.agreement`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from detc.compiler.detection.agreement import (
    DEFAULT_MATCH_IOU,
    DEFAULT_REPORT_SCORE,
    AgreementSummary,
    ImageAgreement,
    aggregate_agreement,
    match_detections,
)
from detc.compiler.detection.datasets import CocoDataset
from detc.compiler.detection.decoders import Decoder, Detections, decode, get_decoder
from detc.compiler.detection.metrics import CocoMetrics, category_ids_for, evaluate_coco
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.fileio import write_bytes_atomically
from detc.compiler.progress import progress as show_progress
from detc.compiler.tensor_compare import TensorDiff, compare_outputs
from detc.compiler.tolerances import Tolerance

#: feeds by input name → outputs by output name (onnxruntime session, compiled artifact, ...)
Runner: TypeAlias = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]

AGREEMENT_PLOT = "box_agreement.png"
DRIFT_PLOT = "score_drift.png"


@dataclass(frozen=True)
class RunnerSummary:
    """One runner's detections evaluated. No latency: a detection check times Python-side calls
    with first runs included, which says nothing of speed (``detc bench`` measures that)."""

    label: str
    metrics: CocoMetrics

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, **self.metrics.to_dict()}


@dataclass(frozen=True)
class DetectionReport:
    spec: ModelSpec
    dataset: str
    decoder: str
    num_images: int
    reference: RunnerSummary
    candidate: RunnerSummary | None = None
    agreement: AgreementSummary | None = None
    per_image: tuple[ImageAgreement, ...] = ()
    tensor_diffs: tuple[TensorDiff, ...] = ()  # worst case over images, one per output
    plots: tuple[str, ...] = field(default=(), compare=False)

    @property
    def map_drop(self) -> float | None:
        """Reference mAP@[.5:.95] minus candidate's, in points (×100); None without candidate."""
        if self.candidate is None:
            return None
        return (self.reference.metrics.map - self.candidate.metrics.map) * 100.0

    @property
    def outputs_within_tolerance(self) -> bool | None:
        if self.candidate is None:
            return None
        return all(diff.within_tolerance for diff in self.tensor_diffs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "decoder": self.decoder,
            "num_images": self.num_images,
            "spec": self.spec.to_dict(),
            "reference": self.reference.to_dict(),
            "candidate": self.candidate.to_dict() if self.candidate else None,
            "map_drop_points": self.map_drop,
            "outputs_within_tolerance": self.outputs_within_tolerance,
            "tensor_diffs": [diff.to_dict() for diff in self.tensor_diffs],
            "agreement": self.agreement.to_dict() if self.agreement else None,
            "per_image": [image.to_dict() for image in self.per_image],
        }
        return _json_safe(out)

    def render_table(self) -> str:
        """A terminal-width summary: metrics side by side, box agreement, output tensors."""
        ref, cand = self.reference, self.candidate
        lines = [
            f"detection check: {self.num_images} images of {self.dataset}, decoder {self.decoder}",
            f"preprocessing: {self.spec.describe_preprocessing()}",
        ]
        header = f"{'':<22}{ref.label:>14}"
        if cand is not None:
            header += f"{cand.label:>14}{'change':>10}"
        lines.append(header)
        for label, ref_value, cand_value in self._metric_rows():
            row = f"{label:<22}{_points(ref_value):>14}"
            if cand is not None:
                row += f"{_points(cand_value):>14}{_delta(ref_value, cand_value):>10}"
            lines.append(row)
        row = f"{'detections':<22}{ref.metrics.num_detections:>14}"
        if cand is not None:
            row += f"{cand.metrics.num_detections:>14}"
        lines.append(row)
        if self.agreement is not None:
            lines.append("")
            lines.extend(_agreement_lines(self.agreement))
        if self.tensor_diffs:
            lines.append("")
            lines.append("output tensors (worst over images):")
            for diff in self.tensor_diffs:
                verdict = "ok" if diff.within_tolerance else "MISMATCH"
                lines.append(
                    f"  {diff.name}: max abs {diff.max_abs_error:.3g}, max rel "
                    f"{diff.max_rel_error:.3g}, cosine {diff.cosine_similarity:.6f} "
                    f"(rtol {diff.rtol:g}, atol {diff.atol:g}) {verdict}"
                )
        return "\n".join(lines)

    def _metric_rows(self) -> list[tuple[str, float | None, float | None]]:
        ref = self.reference.metrics
        cand = self.candidate.metrics if self.candidate else None
        names = ["map", "map50", "map75", "map_small", "map_medium", "map_large"]
        labels = ["mAP@[.5:.95]", "mAP@.5", "mAP@.75", "mAP small", "mAP medium", "mAP large"]
        return [
            (label, getattr(ref, name), getattr(cand, name) if cand else None)
            for label, name in zip(labels, names, strict=True)
        ]

    def render_markdown(self) -> str:
        ref, cand = self.reference, self.candidate
        md = [f"# Detection check: {self.num_images} images", ""]
        md.append(
            f"Dataset `{self.dataset}`, decoder `{self.decoder}`, input "
            f"{self.spec.input_size[0]}x{self.spec.input_size[1]} {self.spec.dtype}, "
            f"score floor {self.spec.score_threshold:g}, NMS IoU {self.spec.iou_threshold:g}."
        )
        md.append("")
        if self.map_drop is not None:
            md.append(
                f"**mAP drop: {self.map_drop:.2f} points** (reference − candidate, "
                "mAP@[.5:.95] × 100)."
            )
            md.append("")
        md.append("## COCO mAP (×100)")
        md.append("")
        head = f"| metric | {ref.label} |" + (f" {cand.label} | change |" if cand else "")
        md.append(head)
        md.append("|---|---:|" + ("---:|---:|" if cand else ""))
        for label, ref_value, cand_value in self._metric_rows():
            row = f"| {label} | {_points(ref_value)} |"
            if cand:
                row += f" {_points(cand_value)} | {_delta(ref_value, cand_value)} |"
            md.append(row)
        md.append(
            f"| detections | {ref.metrics.num_detections} |"
            + (f" {cand.metrics.num_detections} | |" if cand else "")
        )
        md.append("")
        if self.agreement is not None:
            md.append("## Box agreement")
            md.append("")
            md.extend(f"- {line.strip()}" for line in _agreement_lines(self.agreement))
            md.append("")
            differing = sorted(
                (a for a in self.per_image if not a.identical),
                key=lambda a: -(a.lost + a.extra + a.class_flips),
            )
            if differing:
                md.append("Images that differ most:")
                md.append("")
                md.append("| image id | reference boxes | matched | lost | extra | class flips |")
                md.append("|---:|---:|---:|---:|---:|---:|")
                for a in differing[:10]:
                    md.append(
                        f"| {a.image_id} | {a.reference_boxes} | {a.matched} | {a.lost} "
                        f"| {a.extra} | {a.class_flips} |"
                    )
                md.append("")
            for plot in self.plots:
                md.append(f"![{plot}]({plot})")
                md.append("")
        if self.tensor_diffs:
            md.append("## Output tensors (worst over images)")
            md.append("")
            md.append("| output | shape | max abs | max rel | cosine | rtol | atol | verdict |")
            md.append("|---|---|---:|---:|---:|---:|---:|---|")
            for d in self.tensor_diffs:
                verdict = "ok" if d.within_tolerance else "**mismatch**"
                md.append(
                    f"| {d.name} | {'x'.join(map(str, d.shape))} | {d.max_abs_error:.3g} "
                    f"| {d.max_rel_error:.3g} | {d.cosine_similarity:.6f} | {d.rtol:g} "
                    f"| {d.atol:g} | {verdict} |"
                )
            md.append("")
        md.append("## AP@[.5:.95] per class (×100)")
        md.append("")
        md.append(f"| class | {ref.label} |" + (f" {cand.label} | change |" if cand else ""))
        md.append("|---|---:|" + ("---:|---:|" if cand else ""))
        for name, ref_ap in ref.metrics.per_class.items():
            if ref_ap is None and (cand is None or cand.metrics.per_class.get(name) is None):
                continue  # no ground truth of this class among the evaluated images
            row = f"| {name} | {_points(ref_ap)} |"
            if cand:
                cand_ap = cand.metrics.per_class.get(name)
                row += f" {_points(cand_ap)} | {_delta(ref_ap, cand_ap)} |"
            md.append(row)
        md.append("")
        return "\n".join(md)

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write report.json, report.md and the plots into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        plots: list[str] = []
        if self.agreement is not None and self.per_image:
            write_bytes_atomically(out / AGREEMENT_PLOT, _agreement_plot(self.per_image))
            write_bytes_atomically(out / DRIFT_PLOT, _drift_plot(self.agreement))
            plots = [AGREEMENT_PLOT, DRIFT_PLOT]
            written += [out / name for name in plots]
        report = dataclasses.replace(self, plots=tuple(plots))
        write_bytes_atomically(
            out / "report.json", json.dumps(report.to_dict(), indent=2).encode() + b"\n"
        )
        write_bytes_atomically(out / "report.md", report.render_markdown().encode())
        return [out / "report.json", out / "report.md", *written]


@dataclass
class DetectionComparison:
    """A reference and (optionally) a candidate compared image by image: the detections of
    each, their per-image agreement, the worst raw-output difference and the time each took.
    :func:`evaluate_detection` fills one; a caller that holds several models' outputs for the
    same image (an int8 artifact against its float *and* its quantized reference) fills one per
    pair and runs each model once."""

    decoder: str | Decoder
    spec: ModelSpec
    tolerance: Tolerance | None = None
    report_score_threshold: float = DEFAULT_REPORT_SCORE
    match_iou: float = DEFAULT_MATCH_IOU
    #: compare the raw output tensors under ``tolerance`` (float criteria; off where the
    #: caller holds them to another criterion)
    compare_tensors: bool = True
    reference_dets: dict[int, Detections] = field(default_factory=dict)
    candidate_dets: dict[int, Detections] = field(default_factory=dict)
    per_image: list[ImageAgreement] = field(default_factory=list)
    worst: dict[str, TensorDiff] = field(default_factory=dict)

    def detections(self, outputs: Mapping[str, np.ndarray], sample: Any) -> Detections:
        """``outputs`` decoded, boxes in the original image's pixels."""
        found = decode(get_decoder(self.decoder), dict(outputs), self.spec)
        return _to_original(found, sample.transform)

    def add(
        self,
        sample: Any,
        reference: Mapping[str, np.ndarray],
        candidate: Mapping[str, np.ndarray] | None = None,
        *,
        reference_dets: Detections | None = None,
        candidate_dets: Detections | None = None,
    ) -> None:
        """One image's outputs (and their decoded detections, when the caller has them)."""
        image_id = sample.image_id
        if reference_dets is None:
            reference_dets = self.detections(reference, sample)
        self.reference_dets[image_id] = reference_dets
        if candidate is None:
            return
        if candidate_dets is None:
            candidate_dets = self.detections(candidate, sample)
        self.candidate_dets[image_id] = candidate_dets
        if self.compare_tensors:
            for diff in compare_outputs(dict(candidate), dict(reference), self.tolerance):
                self.worst[diff.name] = _worse(self.worst.get(diff.name), diff)
        self.per_image.append(
            match_detections(
                reference_dets,
                candidate_dets,
                image_id=image_id,
                score_threshold=self.report_score_threshold,
                iou_threshold=self.match_iou,
            )
        )

    def report(
        self,
        dataset: CocoDataset,
        *,
        reference_label: str = "reference",
        candidate_label: str = "candidate",
        candidate_metrics: CocoMetrics | None = None,
    ) -> DetectionReport:
        """COCO metrics of both and their agreement over the images added so far.
        ``candidate_metrics``: the candidate's, when another comparison of the same candidate
        detections has evaluated them already."""
        category_ids = category_ids_for(self.spec, dataset)
        reference = RunnerSummary(
            reference_label, evaluate_coco(self.reference_dets, dataset, category_ids)
        )
        candidate = None
        agreement = None
        if self.candidate_dets:
            if candidate_metrics is None:
                candidate_metrics = evaluate_coco(self.candidate_dets, dataset, category_ids)
            candidate = RunnerSummary(candidate_label, candidate_metrics)
            agreement = aggregate_agreement(
                self.per_image,
                score_threshold=self.report_score_threshold,
                iou_threshold=self.match_iou,
            )
        decoder = self.decoder
        decoder_name = (
            decoder if isinstance(decoder, str) else getattr(decoder, "__name__", "custom")
        )
        return DetectionReport(
            spec=self.spec,
            dataset=str(dataset.root),
            decoder=str(decoder_name),
            num_images=len(self.reference_dets),
            reference=reference,
            candidate=candidate,
            agreement=agreement,
            per_image=tuple(self.per_image),
            tensor_diffs=tuple(self.worst.values()),
        )


def dataset_samples(
    dataset: CocoDataset, spec: ModelSpec, max_images: int | None, progress: bool
) -> Iterator[Any]:
    """The dataset's images prepared for ``spec``, under :func:`detc.compiler.progress.progress`
    (a bar on a terminal, lines with the time left in a log)."""
    samples = dataset.samples(spec, max_images)
    if not progress:
        return samples
    total = len(dataset) if max_images is None else min(max_images, len(dataset))
    return show_progress(samples, "detection check", "image", total=total)


def evaluate_detection(
    reference: Runner,
    candidate: Runner | None,
    dataset: CocoDataset,
    spec: ModelSpec,
    decoder: str | Decoder | None = None,
    *,
    max_images: int | None = None,
    progress: bool = True,
    report_score_threshold: float = DEFAULT_REPORT_SCORE,
    match_iou: float = DEFAULT_MATCH_IOU,
    tolerance: Tolerance | None = None,
    reference_label: str = "reference",
    candidate_label: str = "candidate",
) -> DetectionReport:
    """Run ``reference`` (and ``candidate``) on every image of ``dataset`` and compare.

    ``decoder`` defaults to ``spec.decoder``. ``tolerance`` overrides the per-dtype tolerance of
    the raw-output comparison. Errors from the runners propagate unchanged.
    """
    comparison = DetectionComparison(
        spec.decoder if decoder is None else decoder,
        spec,
        tolerance,
        report_score_threshold,
        match_iou,
    )
    get_decoder(comparison.decoder)  # an unknown decoder fails before the long run
    category_ids_for(spec, dataset)  # and so does a bad class mapping
    for sample in dataset_samples(dataset, spec, max_images, progress):
        feeds = {spec.input_name: sample.tensor}
        reference_out = dict(reference(feeds))
        candidate_out = None if candidate is None else dict(candidate(feeds))
        comparison.add(sample, reference_out, candidate_out)
    return comparison.report(
        dataset, reference_label=reference_label, candidate_label=candidate_label
    )


def _to_original(dets: Detections, transform: Any) -> Detections:
    return dets.with_boxes(transform.boxes_to_original(dets.boxes))


def _worse(previous: TensorDiff | None, new: TensorDiff) -> TensorDiff:
    """Fold one image's diff into the running worst case of that output."""
    if previous is None:
        return new
    if new.dtype == "missing" or previous.dtype == "missing":
        return new if new.dtype == "missing" else previous
    return dataclasses.replace(
        previous,
        max_abs_error=max(previous.max_abs_error, new.max_abs_error),
        max_rel_error=max(previous.max_rel_error, new.max_rel_error),
        cosine_similarity=min(previous.cosine_similarity, new.cosine_similarity),
        within_tolerance=previous.within_tolerance and new.within_tolerance,
    )


def _points(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}"


def _delta(reference: float | None, candidate: float | None) -> str:
    if reference is None or candidate is None:
        return ""
    change = (candidate - reference) * 100
    # "-0.00" reads like a loss: show changes that round to zero as "+0.00"
    return f"{0.0 if abs(change) < 0.005 else change:+.2f}"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _agreement_lines(a: AgreementSummary) -> list[str]:
    return [
        f"box agreement (score ≥ {a.score_threshold:g}, IoU ≥ {a.iou_threshold:g}): "
        f"{a.agreement * 100:.1f}% over {a.images} images ({a.images_identical} identical)",
        f"  reference boxes {a.reference_boxes}, candidate boxes {a.candidate_boxes}: "
        f"matched {a.matched}, lost {a.lost}, extra {a.extra}, class flips {a.class_flips}",
        f"  matched IoU mean {_fmt(a.mean_iou, '.4f')}, min {_fmt(a.min_iou, '.4f')}; "
        f"score drift mean {_fmt(a.mean_score_drift, '.2g')}, "
        f"p99 {_fmt(a.p99_score_drift, '.2g')}, max {_fmt(a.max_score_drift, '.2g')}",
    ]


def _json_safe(value: Any) -> Any:
    """Strict JSON has no NaN/Infinity: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _agreement_plot(per_image: tuple[ImageAgreement, ...]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6), layout="constrained")
    axes = figure.add_subplot()
    index = np.arange(len(per_image))
    bottom = np.zeros(len(per_image))
    for label, color, counts in (
        ("matched", "#4c9a2a", [a.matched for a in per_image]),
        ("class flip", "#e0a500", [a.class_flips for a in per_image]),
        ("lost", "#c0392b", [a.lost for a in per_image]),
        ("extra", "#2c6fbb", [a.extra for a in per_image]),
    ):
        values = np.asarray(counts, dtype=np.float64)
        axes.bar(index, values, bottom=bottom, color=color, label=label, width=0.85)
        bottom += values
    axes.set_xlabel("image (evaluation order)")
    axes.set_ylabel("boxes")
    axes.set_title("Box agreement per image (candidate vs reference)")
    axes.legend(loc="upper right", fontsize="small", ncols=4)
    return _png(figure)


def _drift_plot(agreement: AgreementSummary) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6), layout="constrained")
    axes = figure.add_subplot()
    drifts = np.asarray(agreement.score_drifts, dtype=np.float64)
    if drifts.size:
        top = max(float(drifts.max()), 1e-9)
        axes.hist(drifts, bins=np.linspace(0.0, top, 41).tolist(), color="#2c6fbb", log=True)
    else:
        axes.text(0.5, 0.5, "no matched boxes", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("|candidate score − reference score|")
    axes.set_ylabel("matched boxes")
    axes.set_title("Score drift of matched boxes")
    return _png(figure)
