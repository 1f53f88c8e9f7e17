"""``detc verify --data``: the artifact and its reference on every image, compared as detections."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler.detection.datasets import CocoDataset
from detc.compiler.detection.report import (
    DetectionComparison,
    DetectionReport,
    Runner,
    dataset_samples,
    evaluate_detection,
)
from detc.compiler.detection.spec import ModelSpec, spec_from_onnx
from detc.compiler.errors import BadInputError
from detc.compiler.fileio import write_text_atomically
from detc.compiler.reference import ort_session, run_session
from detc.compiler.verify.quantization import (
    is_quantized,
    quantization_lines,
    quantization_record,
    quantized_reference_path,
)
from detc.compiler.verify.runner import artifact_batch_runner, reference_proto
from detc.compiler.verify.tensors import (
    Int8Agreement,
    QuantizedOutputAgreement,
    criterion_line,
    format_db,
    int8_criterion,
    jittered_reference,
)


def _spec_for(manifest: Mapping[str, Any], reference: Any, decoder: str | None) -> ModelSpec:
    stored = manifest.get("model_spec")
    has_stored = bool(stored)
    if isinstance(stored, Mapping) and decoder is not None:
        stored = {k: v for k, v in stored.items() if k != "decoder"}  # the user's choice wins
    # An artifact is passed around: its manifest may name only registered decoders, never a
    # module for detc to import (a --decoder module:function on the command line is the user's).
    spec = (
        ModelSpec.from_dict(stored, source="the artifact's manifest", allow_decoder_hooks=False)
        if has_stored
        else spec_from_onnx(reference)
    )
    if decoder is not None:
        spec = spec.with_overrides(decoder=decoder)
    if not spec.decoder:
        raise BadInputError(
            "the artifact's manifest names no decoder: give --decoder (yolov5, yolov8, yolox, demo "
            "or module:function)"
        )
    return spec


def _tensor_key(feeds: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha1()
    for name in sorted(feeds):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(feeds[name]).tobytes())
    return digest.hexdigest()


def _artifact_runner(
    artifact: str | os.PathLike[str],
    dataset: CocoDataset,
    spec: ModelSpec,
    max_images: int | None,
    emulate: bool,
    device: str | None,
    num_threads: int | None,
) -> tuple[Runner, str]:
    """The artifact as a per-image runner, and its label in reports."""
    batch = artifact_batch_runner(artifact, emulate=emulate, device=device, num_threads=num_threads)
    if emulate or device is not None:
        # Each emulated (or remote) call pays a process start / upload: run every image in one
        # batch first, then hand the outputs to the per-image evaluation by content.
        feed_list = [{spec.input_name: s.tensor} for s in dataset.samples(spec, max_images)]
        outputs = batch(feed_list)
        precomputed = {_tensor_key(f): o for f, o in zip(feed_list, outputs, strict=True)}
        label = "detc (emulated: numerics only)" if emulate else f"detc ({device})"

        def candidate(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return precomputed[_tensor_key(feeds)]

        return candidate, label
    return (lambda feeds: batch([feeds])[0]), "detc"


def verify_detection(
    artifact: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    data: str | os.PathLike[str],
    *,
    decoder: str | None = None,
    max_images: int | None = None,
    emulate: bool = False,
    device: str | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> DetectionReport:
    """Run both on every image of a COCO dataset: mAP of each, box agreement, tensor diffs."""
    ref_proto = reference_proto(reference, manifest)
    spec = _spec_for(manifest, ref_proto, decoder)
    dataset = CocoDataset(Path(data), spec)
    session = ort_session(ref_proto, threads=num_threads or 0)
    candidate, label = _artifact_runner(
        artifact, dataset, spec, max_images, emulate, device, num_threads
    )
    return evaluate_detection(
        lambda feeds: run_session(session, feeds),
        candidate,
        dataset,
        spec,
        spec.decoder,
        max_images=max_images,
        progress=progress,
        reference_label=f"onnxruntime ({Path(reference).name})",
        candidate_label=label,
    )


# --- int8 artifacts ----------------------------------------------------------------------------

#: the mAP budget of an int8 artifact when neither --max-map-drop nor the compile stated one
DEFAULT_INT8_MAP_BUDGET = 1.0
QUANTIZED_SUBREPORT = "vs_quantized_reference"


def map_budget(record: Mapping[str, Any], max_map_drop: float | None) -> tuple[float, str]:
    """The mAP drop (points) an int8 artifact may show against the float model, and whence."""
    if max_map_drop is not None:
        return max_map_drop, "--max-map-drop"
    recorded = record.get("max_map_drop")
    if recorded is not None:
        return float(recorded), "the compile's max_map_drop"
    return DEFAULT_INT8_MAP_BUDGET, "default"


@dataclass(frozen=True)
class QuantizedDetectionReport:
    """An int8 artifact on a COCO set: its mAP against the float model's (the accuracy budget)
    and its agreement with the quantized reference in onnxruntime (boxes and output tensors)."""

    versus_float: DetectionReport  # reference: the float model in onnxruntime
    versus_quantized: DetectionReport  # reference: the QDQ model in onnxruntime
    outputs: tuple[QuantizedOutputAgreement, ...]
    quantization: dict[str, Any]
    max_map_drop: float
    budget_source: str
    #: approximate passes other than quantize that the build ran: their loss counts in the drop
    #: too (the float model is the source, before every pass)
    other_approximate: tuple[str, ...] = ()

    @property
    def map_drop(self) -> float | None:
        return self.versus_float.map_drop

    @property
    def within_budget(self) -> bool:
        return self.map_drop is not None and self.map_drop <= self.max_map_drop

    @property
    def outputs_agree(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def ok(self) -> bool:
        return self.within_budget and self.outputs_agree

    def failures(self) -> list[str]:
        found = []
        if not self.within_budget:
            also = (
                f"; it includes {', '.join(self.other_approximate)}: --max-map-drop sets the "
                "budget of the whole pipeline"
                if self.other_approximate
                else ""
            )
            found.append(
                f"mAP@[.5:.95] dropped {self.map_drop:.2f} points against the float model "
                f"(> {self.max_map_drop:g}, {self.budget_source}){also}"
            )
        bad = [o.name for o in self.outputs if not o.ok]
        if bad:
            found.append(
                f"output(s) {', '.join(bad)} disagree with the quantized reference over "
                f"{self.versus_float.num_images} images"
            )
        return found

    def _map_rows(self) -> list[tuple[str, str, str, str]]:
        exact = self.versus_float.reference.metrics
        qdq = self.versus_quantized.reference.metrics
        cand = self.versus_float.candidate
        assert cand is not None
        names = ["map", "map50", "map75"]
        labels = ["mAP@[.5:.95]", "mAP@.5", "mAP@.75"]
        return [
            (
                label,
                _points(getattr(exact, name)),
                _points(getattr(qdq, name)),
                _points(getattr(cand.metrics, name)),
            )
            for label, name in zip(labels, names, strict=True)
        ]

    def _budget_line(self) -> str:
        verdict = "ok" if self.within_budget else "OVER BUDGET"
        drop = "n/a" if self.map_drop is None else f"{self.map_drop:.2f}"
        line = (
            f"mAP drop against float: {drop} points (budget {self.max_map_drop:g}, "
            f"{self.budget_source}) {verdict}"
        )
        if self.other_approximate:
            line += f"; the drop includes {', '.join(self.other_approximate)}"
        return line

    def _agreement_line(self, report: DetectionReport, versus: str) -> str:
        a = report.agreement
        if a is None:
            return f"boxes vs {versus}: n/a"
        return (
            f"boxes vs {versus}: {a.agreement * 100:.1f}% agree (matched {a.matched}, lost "
            f"{a.lost}, extra {a.extra}, class flips {a.class_flips}; {a.images_identical} of "
            f"{a.images} images identical)"
        )

    def render_table(self) -> str:
        cand = self.versus_float.candidate
        assert cand is not None
        lines = [
            f"int8 check: {self.versus_float.num_images} images of {self.versus_float.dataset}, "
            f"decoder {self.versus_float.decoder}",
            f"preprocessing: {self.versus_float.spec.describe_preprocessing()}",
            f"{'':<16}{'float (ort)':>14}{'QDQ (ort)':>14}{cand.label:>16}",
        ]
        for label, exact, qdq, mine in self._map_rows():
            lines.append(f"{label:<16}{exact:>14}{qdq:>14}{mine:>16}")
        lines.append(self._budget_line())
        lines.append(self._agreement_line(self.versus_float, "float"))
        lines.append(self._agreement_line(self.versus_quantized, "QDQ reference"))
        lines.append("output tensors vs the quantized reference (all images together):")
        for o in self.outputs:
            lines.append(
                f"  {o.name}: SQNR {o.sqnr_db:.1f} dB (least {o.least_sqnr_db:.1f}), max abs "
                f"{o.max_abs_error:.3g}, p99 abs "
                f"{o.p99_abs_error:.3g}; vs float: artifact "
                f"{format_db(o.artifact_float_sqnr_db)}, "
                f"QDQ {format_db(o.reference_float_sqnr_db)}  "
                f"{o.verdict()}"
            )
        lines.append("  " + criterion_line())
        return "\n".join(lines)

    def render_markdown(self) -> str:
        cand = self.versus_float.candidate
        assert cand is not None
        md = ["## int8 artifact", ""]
        md.append(
            "The artifact against the float model (the accuracy budget) and against the "
            "quantized model it was compiled from, run by onnxruntime "
            f"(`{QUANTIZED_SUBREPORT}/report.md`)."
        )
        md.append("")
        md.append(f"| metric (×100) | float (onnxruntime) | QDQ (onnxruntime) | {cand.label} |")
        md.append("|---|---:|---:|---:|")
        md.extend(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self._map_rows())
        md.append("")
        md.append(f"- {self._budget_line()}")
        md.append(f"- {self._agreement_line(self.versus_float, 'float')}")
        md.append(f"- {self._agreement_line(self.versus_quantized, 'QDQ reference')}")
        md.append("")
        md.append(
            "| output | SQNR vs QDQ | least | max abs | p99 abs | artifact vs float "
            "| QDQ vs float | verdict |"
        )
        md.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for o in self.outputs:
            md.append(
                f"| {o.name} | {format_db(o.sqnr_db)} | {format_db(o.least_sqnr_db)} "
                f"| {o.max_abs_error:.3g} "
                f"| {o.p99_abs_error:.3g} "
                f"| {format_db(o.artifact_float_sqnr_db)} | {format_db(o.reference_float_sqnr_db)} "
                f"| {o.verdict()} |"
            )
        md.append("")
        md.append(criterion_line() + ".")
        md.append("")
        md.append("```")
        md.extend(quantization_lines(self.quantization))
        md.append("```")
        md.append("")
        return "\n".join(md)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "map_drop_points": self.map_drop,
            "max_map_drop": self.max_map_drop,
            "budget_source": self.budget_source,
            "other_approximate_passes": list(self.other_approximate),
            "maps": {
                "float": self.versus_float.reference.metrics.map,
                "quantized_reference": self.versus_quantized.reference.metrics.map,
                "artifact": None
                if self.versus_float.candidate is None
                else self.versus_float.candidate.metrics.map,
            },
            "agreement_with_float": None
            if self.versus_float.agreement is None
            else self.versus_float.agreement.to_dict(),
            "agreement_with_quantized_reference": None
            if self.versus_quantized.agreement is None
            else self.versus_quantized.agreement.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "criterion": int8_criterion(),
            "quantization": self.quantization,
        }

    def write(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """report.md / report.json against the float model (with an int8 section appended),
        the same against the quantized reference in a subfolder, and quantization.json."""
        out = Path(out_dir)
        written = self.versus_float.write(out)
        written += self.versus_quantized.write(out / QUANTIZED_SUBREPORT)
        markdown = out / "report.md"
        combined = markdown.read_text(encoding="utf-8") + "\n" + self.render_markdown()
        write_text_atomically(markdown, combined)
        document = json.dumps(self.to_dict(), indent=2) + "\n"
        write_text_atomically(out / "quantization.json", document)
        return [*written, out / "quantization.json"]


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def verify_quantized_detection(
    artifact: str | os.PathLike[str],
    float_reference: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    data: str | os.PathLike[str],
    *,
    max_map_drop: float | None = None,
    decoder: str | None = None,
    max_images: int | None = None,
    emulate: bool = False,
    device: str | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> QuantizedDetectionReport:
    """An int8 artifact on every image: mAP against the float model (within ``max_map_drop``,
    default: the compile's budget, else 1.0 point), and agreement with its quantized reference
    (boxes, and the output tensors under the int8 criterion of
    :mod:`detc.compiler.verify.tensors`)."""
    record = quantization_record(manifest)
    if record is None:
        raise BadInputError(f"{artifact}: not an int8 artifact (no quantization record)")
    budget, budget_source = map_budget(record, max_map_drop)
    float_proto = reference_proto(float_reference, manifest)
    quantized_proto = reference_proto(quantized_reference_path(artifact, record), manifest)
    # a quantized "float" reference still measures the mAP drop, but is no float model to
    # hold the tensors to
    compare_with_float = not is_quantized(float_proto)
    spec = _spec_for(manifest, float_proto, decoder)
    dataset = CocoDataset(Path(data), spec)
    threads = num_threads or 0
    float_session = ort_session(float_proto, threads=threads)
    quantized_session = ort_session(quantized_proto, threads=threads)
    jittered_session = ort_session(jittered_reference(quantized_proto), threads=threads)
    candidate, label = _artifact_runner(
        artifact, dataset, spec, max_images, emulate, device, num_threads
    )
    label = label.replace("detc", "detc int8", 1)
    # One pass, each model once per image: the artifact against the float model (mAP drop)
    # and against its quantized reference (boxes), and the int8 tensor criterion on all four.
    # (float tolerances do not apply to int8 outputs: Int8Agreement holds the tensors)
    versus_float = DetectionComparison(spec.decoder, spec, compare_tensors=False)
    versus_quantized = DetectionComparison(spec.decoder, spec, compare_tensors=False)
    agreement = Int8Agreement()
    for sample in dataset_samples(dataset, spec, max_images, progress):
        feeds = {spec.input_name: sample.tensor}
        exact = run_session(float_session, feeds)
        quantized = run_session(quantized_session, feeds)
        jittered = run_session(jittered_session, feeds)
        outputs = dict(candidate(feeds))
        artifact_dets = versus_float.detections(outputs, sample)
        versus_float.add(sample, exact, outputs, candidate_dets=artifact_dets)
        versus_quantized.add(sample, quantized, outputs, candidate_dets=artifact_dets)
        agreement.add(outputs, quantized, jittered, exact if compare_with_float else None)
    labels: dict[str, Any] = {"candidate_label": label}
    float_report = versus_float.report(
        dataset, reference_label=f"onnxruntime ({Path(float_reference).name})", **labels
    )
    # the same artifact detections: evaluated once
    artifact_summary = float_report.candidate
    quantized_report = versus_quantized.report(
        dataset,
        reference_label="onnxruntime (QDQ)",
        candidate_metrics=artifact_summary.metrics if artifact_summary is not None else None,
        **labels,
    )
    other_approximate = tuple(
        str(step["pass"])
        for step in manifest.get("passes", [])
        if not step.get("exact", True)
        and step.get("modified")
        and not str(step["pass"]).startswith("quantize")
    )
    return QuantizedDetectionReport(
        float_report,
        quantized_report,
        tuple(agreement.results()),
        dict(record),
        budget,
        budget_source,
        other_approximate,
    )
