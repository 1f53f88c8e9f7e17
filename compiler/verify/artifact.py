"""Verify an artifact the way ``detc verify`` does, from Python.

The policy in one place: a float artifact is held to its float reference in onnxruntime (tensor
tolerances; with a dataset, the mAP drop within ``max_map_drop`` when given); an int8 artifact to
the quantized model saved in it (the int8 criterion of :mod:`detc.compiler.verify.tensors`) and,
with a dataset, to the float model's mAP within its budget. The reference defaults to the float
model the artifact keeps (``reference.onnx``, checked against its manifest); nothing outside the
artifact is opened unless the caller names it. Every failed check is collected, so one run names
them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detc.compiler.errors import EXIT_MISMATCH, EXIT_OK, BadInputError, VerificationMismatchError
from detc.compiler.verify.quantization import quantization_lines, quantization_record
from detc.compiler.verify.runner import read_manifest
from detc.compiler.verify.tensors import (
    QuantizedTensorReport,
    TensorReport,
    verify_quantized_tensors,
    verify_tensors,
)

if TYPE_CHECKING:
    from detc.compiler.detection.report import DetectionReport
    from detc.compiler.verify.detection import QuantizedDetectionReport
    from detc.compiler.verify.prepost import PrepostVerification


def source_model(manifest: Mapping[str, Any], artifact_dir: str | os.PathLike[str]) -> Path | None:
    """The float model the artifact was compiled from, as ONNX: the copy the artifact keeps
    (``reference.onnx``), checked against the sha256 in its manifest; None for an artifact that
    keeps none. ``source.path`` in the manifest is provenance only: a path outside the artifact
    is never opened (it may be another machine's, or name a file that is no longer the one
    compiled)."""
    from detc.targets import Artifact

    del manifest  # read again, and checked, with the artifact
    return Artifact.open(Path(artifact_dir)).reference_model()


def default_reference(manifest: Mapping[str, Any], artifact_dir: str | os.PathLike[str]) -> Path:
    """:func:`source_model`, or BadInputError asking for ``--reference`` when there is none."""
    found = source_model(manifest, artifact_dir)
    if found is not None:
        return found
    raise BadInputError(
        f"{artifact_dir}: the artifact keeps no reference model (compiled by an older detc); "
        "give --reference MODEL.onnx, or re-run detc compile"
    )


@dataclass
class VerificationReport:
    """What :func:`verify_artifact` found: the tensor comparison, the detection comparison (with
    a dataset), and every check that failed."""

    artifact: Path
    manifest: dict[str, Any]
    #: float artifacts: against the float reference; int8: against the quantized reference;
    #: compiled pre/post-processing: detections against the float reference path
    tensors: TensorReport | QuantizedTensorReport | PrepostVerification
    #: the float model compared with (None: an int8 artifact whose float model is gone)
    reference: Path | None
    detection: DetectionReport | QuantizedDetectionReport | None = None
    #: where the detection report (report.md, report.json) was written
    report_dir: Path | None = None
    failures: list[str] = field(default_factory=list)
    #: a pruned or factorized build: the graph its tensors are held to (kept in the artifact);
    #: ``reference`` is then the source model, for the mAP budget
    transformed_reference: Path | None = None
    #: compiled pre/post-processing with a dataset: the per-image detection comparison
    prepost_dataset: Any = None

    @property
    def approximate_passes(self) -> list[str]:
        """The approximate passes (not quantize) that changed the compiled float graph."""
        return list((self.manifest.get("approximate") or {}).get("passes", []))

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The manifest's int8 record; None for a float artifact."""
        return quantization_record(self.manifest)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_status(self) -> int:
        """The exit code ``detc verify`` returns for this report."""
        return EXIT_OK if self.ok else EXIT_MISMATCH

    def tensor_lines(self) -> list[str]:
        """The tensor comparison as ``detc verify`` prints it (without ``--json``)."""
        tensors = self.tensors
        if self.manifest.get("prepost"):
            return [
                f"reference {self.reference}, inputs: {tensors.inputs}",
                tensors.table(),
                *tensors.notes,
            ]
        if isinstance(tensors, QuantizedTensorReport):
            lines = quantization_lines(tensors.quantization)
            lines.append(
                f"quantized reference {tensors.quantized_reference}, float reference "
                f"{self.reference or '(none)'}, inputs: {tensors.inputs}"
            )
        elif self.transformed_reference is not None:
            lines = [
                f"reference {self.transformed_reference} (the graph "
                f"{', '.join(self.approximate_passes)} left; the source model "
                f"{self.reference} is the accuracy reference), inputs: {tensors.inputs}"
            ]
        else:
            lines = [f"reference {self.reference}, inputs: {tensors.inputs}"]
        return [*lines, tensors.table(), *tensors.notes]

    def detection_lines(self) -> list[str]:
        """The detection comparison's table and where its report went (empty without one)."""
        if self.detection is None or self.report_dir is None:
            return []
        if self.prepost_dataset is not None:
            return [
                self.detection.render_table(),
                *self.prepost_dataset.lines(),
                f"report: {self.report_dir / 'report.md'} (and report.json)",
            ]
        written = "report.json, quantization.json" if self.quantization else "report.json"
        return [
            self.detection.render_table(),
            f"report: {self.report_dir / 'report.md'} (and {written})",
        ]

    def lines(self) -> list[str]:
        """The report as text, as ``detc verify`` prints it, then a verdict: ``verify: ok`` or
        the failed checks."""
        verdict = "verify: ok" if self.ok else "verify: " + "; ".join(self.failures)
        return [*self.tensor_lines(), *self.detection_lines(), verdict]

    def error(self) -> VerificationMismatchError | None:
        """The error ``detc verify`` exits with (status 3), naming every failed check."""
        if self.ok:
            return None
        return VerificationMismatchError(f"{self.artifact}: " + "; ".join(self.failures))

    def raise_for_failures(self) -> None:
        error = self.error()
        if error is not None:
            raise error


def verify_artifact(
    artifact_dir: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | None = None,
    inputs: str | None = None,
    seed: int = 0,
    runs: int = 1,
    data: str | os.PathLike[str] | None = None,
    decoder: str | None = None,
    max_images: int | None = None,
    max_map_drop: float | None = None,
    min_reference_map: float = 1.0,
    report_dir: str | os.PathLike[str] | None = None,
    emulate: bool = False,
    device: str | None = None,
    threads: int | None = None,
    on_tensors: Callable[[VerificationReport], None] | None = None,
) -> VerificationReport:
    """Check the artifact in ``artifact_dir`` against its reference; the report says what failed.

    ``reference``: the float model (default: the one the artifact was compiled from). Inputs come
    from ``inputs`` (an .npz keyed by input name) or are seeded random (``runs`` sets from
    ``seed``). With ``data`` (a COCO folder) both also run on every image, and the detection
    report is written to ``report_dir`` (default: ARTIFACT/report). ``max_map_drop``: points of
    mAP@[.5:.95] the artifact may lose (int8 default: the compile's budget, else 1.0; float
    default: no limit). ``min_reference_map``: the reference's own mAP@.5 (points) below which
    the dataset check fails as a likely preprocessing or decoder mismatch. ``emulate`` runs a
    cross-compiled artifact under qemu, ``device`` on a board (rpc://...). ``on_tensors``
    gets the report once the tensors are compared, before the slower dataset run: the CLI
    prints the tensor table then.

    Raises BadInputError for what cannot be checked (no artifact, no reference, bad dataset); a
    failed check is not raised but listed in ``failures`` (see :meth:`~VerificationReport.
    raise_for_failures`).
    """
    artifact = Path(artifact_dir)
    manifest = read_manifest(artifact)
    if emulate and device is not None:
        raise BadInputError("--emulate and --device exclude each other: pick one place to run")
    report: VerificationReport
    if manifest.get("prepost"):
        return _verify_prepost(
            artifact,
            manifest,
            reference=reference,
            seed=seed,
            runs=runs,
            data=data,
            decoder=decoder,
            max_images=max_images,
            max_map_drop=max_map_drop,
            min_reference_map=min_reference_map,
            report_dir=artifact / "report" if report_dir is None else Path(report_dir),
            emulate=emulate,
            device=device,
            threads=threads,
            on_tensors=on_tensors,
        )
    if quantization_record(manifest) is not None:
        float_reference = Path(reference) if reference else source_model(manifest, artifact)
        if data is not None and float_reference is None:
            default_reference(manifest, artifact)  # raises: the mAP budget needs the float model
        quantized = verify_quantized_tensors(
            artifact,
            float_reference,
            inputs=inputs,
            seed=seed,
            runs=runs,
            num_threads=threads,
            emulate=emulate,
            device=device,
        )
        report = VerificationReport(artifact, manifest, quantized, float_reference)
        if not quantized.ok:
            bad = [o.name for o in quantized.outputs if not o.ok]
            report.failures.append(
                f"output(s) {', '.join(bad)} disagree with the quantized reference"
            )
    else:
        float_reference = Path(reference) if reference else default_reference(manifest, artifact)
        # a pruned/factorized build computes another function than its source: its tensors are
        # held to the graph it compiled, its accuracy to the source (with --data, under a budget)
        transformed = _transformed_reference(manifest, artifact)
        tensors = verify_tensors(
            artifact,
            transformed or float_reference,
            inputs=inputs,
            seed=seed,
            runs=runs,
            num_threads=threads,
            emulate=emulate,
            device=device,
        )
        report = VerificationReport(
            artifact, manifest, tensors, float_reference, transformed_reference=transformed
        )
        if not tensors.ok:
            bad = [d.name for d in tensors.diffs if not d.within_tolerance]
            report.failures.append(f"output(s) {', '.join(bad)} beyond tolerance")
    if on_tensors is not None:
        on_tensors(report)
    if data is not None:
        _verify_on_dataset(
            report,
            Path(data),
            decoder=decoder,
            max_images=max_images,
            max_map_drop=max_map_drop,
            min_reference_map=min_reference_map,
            report_dir=artifact / "report" if report_dir is None else Path(report_dir),
            emulate=emulate,
            device=device,
            threads=threads,
        )
    return report


def _verify_on_dataset(
    report: VerificationReport,
    data: Path,
    *,
    decoder: str | None,
    max_images: int | None,
    max_map_drop: float | None,
    min_reference_map: float,
    report_dir: Path,
    emulate: bool,
    device: str | None,
    threads: int | None,
) -> None:
    """Run the artifact and its reference(s) on every image of ``data``; write the detection
    report to ``report_dir`` and add its failed checks to ``report``."""
    # imported here: PIL and tqdm stay out of `import detc`
    from detc.compiler.verify.detection import verify_detection, verify_quantized_detection

    # a float artifact always has its reference; an int8 one was refused above without it
    assert report.reference is not None
    if report.quantization is not None:
        quantized = verify_quantized_detection(
            report.artifact,
            report.reference,
            report.manifest,
            data,
            max_map_drop=max_map_drop,
            decoder=decoder,
            max_images=max_images,
            emulate=emulate,
            device=device,
            num_threads=threads,
        )
        quantized.write(report_dir)
        report.detection, report.report_dir = quantized, report_dir
        report.failures += _reference_finds_objects(quantized.versus_float, data, min_reference_map)
        report.failures += quantized.failures()
        return
    detection = verify_detection(
        report.artifact,
        report.reference,
        report.manifest,
        data,
        decoder=decoder,
        max_images=max_images,
        emulate=emulate,
        device=device,
        num_threads=threads,
    )
    detection.write(report_dir)
    report.detection, report.report_dir = detection, report_dir
    report.failures += _reference_finds_objects(detection, data, min_reference_map)
    drop = detection.map_drop
    budget, whence = max_map_drop, "--max-map-drop"
    if budget is None and report.approximate_passes:
        budget, whence = DEFAULT_APPROXIMATE_MAP_BUDGET, "the default budget of approximate builds"
    if budget is not None and drop is not None and drop > budget:
        passes = report.approximate_passes
        cause = f" by {', '.join(passes)}" if passes else ""
        report.failures.append(
            f"mAP@[.5:.95] dropped {drop:.2f} points{cause} (> {whence} {budget}; "
            "--max-map-drop sets the budget)"
        )


def _reference_finds_objects(
    detection: DetectionReport, data: Path, min_reference_map: float
) -> list[str]:
    """A failure when the reference model itself finds (almost) nothing on the dataset: an mAP
    drop of 0.0 against a reference below ``min_reference_map`` (points of mAP@.5) proves
    nothing."""
    metrics = detection.reference.metrics
    if metrics.map50 * 100.0 >= min_reference_map:
        return []
    return [
        f"the reference model finds almost nothing on {data} (mAP@.5 {metrics.map50 * 100:.1f}, "
        f"{metrics.num_detections} detections over {detection.num_images} images): the "
        f"preprocessing ({detection.spec.describe_preprocessing()}) or the decoder "
        f"({detection.decoder}) likely do not match the model; name the model's family with "
        "--decoder (yolov5, yolov8, yolox, ...) or give a --spec file"
    ]


#: the mAP@[.5:.95] points a pruned or factorized build may lose against its source when
#: neither --max-map-drop nor anything else says (as int8 builds)
DEFAULT_APPROXIMATE_MAP_BUDGET = 1.0


def _transformed_reference(manifest: Mapping[str, Any], artifact: Path) -> Path | None:
    """The graph a pruned/factorized build compiled, from inside the artifact (sha256 checked);
    None for a build no approximate pass changed."""
    if not manifest.get("approximate"):
        return None
    from detc.targets import Artifact

    return Artifact.open(artifact).checked_file("approximate.reference")


#: mAP@[.5:.95] points by which compiled pre/post-processing may differ from the Python path
#: when --max-map-drop does not say (issue #20: equal; this allows for TVM's float rounding)
PREPOST_MAP_TOLERANCE = 0.1


def _verify_prepost(
    artifact: Path,
    manifest: dict[str, Any],
    *,
    reference: str | os.PathLike[str] | None,
    seed: int,
    runs: int,
    data: str | os.PathLike[str] | None,
    decoder: str | None,
    max_images: int | None,
    max_map_drop: float | None,
    min_reference_map: float,
    report_dir: Path,
    emulate: bool,
    device: str | None,
    threads: int | None,
    on_tensors: Callable[[VerificationReport], None] | None,
) -> VerificationReport:
    """An artifact with compiled pre/post-processing: its detections against the float
    reference path (:mod:`detc.compiler.verify.prepost`), on seeded synthetic images of varied
    sizes, and with ``data`` on every image of the dataset (mAP both ways)."""
    from detc.compiler.detection.datasets import CocoDataset
    from detc.compiler.frontend import load_onnx_proto
    from detc.compiler.reference import ort_session, run_session
    from detc.compiler.verify.detection import _spec_for
    from detc.compiler.verify.prepost import (
        PrepostVerification,
        evaluate_prepost_dataset,
        run_prepost_images,
        synthetic_images,
    )
    from detc.compiler.verify.runner import artifact_batch_runner

    float_reference = Path(reference) if reference else default_reference(manifest, artifact)
    proto, _ = load_onnx_proto(float_reference)
    spec = _spec_for(manifest, proto, decoder)
    session = ort_session(proto, threads=threads or 0)

    def reference_runner(feeds: Any) -> dict[str, Any]:
        return run_session(session, feeds)

    candidate = artifact_batch_runner(artifact, emulate=emulate, device=device, num_threads=threads)
    entry = dict(manifest["prepost"])
    entry.setdefault("score_threshold", spec.score_threshold)
    images = synthetic_images(spec, seed, 5 * max(runs, 1))
    comparison = run_prepost_images(entry, spec, reference_runner, candidate, images)
    checked = PrepostVerification(
        comparison, inputs=f"{len(images)} seeded synthetic images of varied sizes (seed {seed})"
    )
    report = VerificationReport(artifact, manifest, checked, float_reference)
    if not checked.ok:
        report.failures.append(
            f"detections disagree with the float reference path on "
            f"{len(comparison.mismatches)} of {len(images)} images"
        )
    if on_tensors is not None:
        on_tensors(report)
    if data is None:
        return report
    dataset = CocoDataset(Path(data), spec)
    label = "detc (emulated: numerics only)" if emulate else "detc"
    detection, strict = evaluate_prepost_dataset(
        entry,
        spec,
        reference_runner,
        candidate,
        dataset,
        max_images=max_images,
        reference_label="onnxruntime + Python pre/post",
        candidate_label=f"{label} (compiled)",
    )
    detection.write(report_dir)
    report.detection, report.report_dir = detection, report_dir
    report.failures += _reference_finds_objects(detection, Path(data), min_reference_map)
    if strict.mismatches:
        report.failures.append(
            f"detections disagree with the float reference path on {len(strict.mismatches)} "
            f"of {len(strict.images)} images of {data} (first: {strict.mismatches[0].describe()})"
        )
    budget = PREPOST_MAP_TOLERANCE if max_map_drop is None else max_map_drop
    drop = detection.map_drop
    if drop is not None and abs(drop) > budget:
        report.failures.append(
            f"mAP@[.5:.95] differs from the Python path by {drop:.2f} points (> {budget:g}; "
            "--max-map-drop sets the budget)"
        )
    report.prepost_dataset = strict
    return report
