"""Verifying an artifact with compiled pre/post-processing (``--with-preprocess``/``--with-nms``).

Its raw outputs are not the model's (or its input is an image, not a tensor), so the tensor
comparison of ``detc verify`` does not apply. What is compared instead, image by image, is what
a user gets: the artifact's detections against the float reference path, which is the reference
model in onnxruntime on detc's Python preprocessing and Python decoder, boxes mapped to original
pixels with :class:`~detc.compiler.detection.datasets.LetterboxTransform`. Two detection lists
agree when they have the same length, the same classes in the same order and every box within
:data:`BOX_TOLERANCE_PX` pixels.

Low-score detections near the score floor and near-equal scores can swap places when the network
is computed in another order (TVM against onnxruntime): the strict comparison counts detections
scoring at least :data:`STRICT_SCORE` (what a deployment shows), and reports the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detc.compiler.detection.datasets import LetterboxTransform, preprocess
from detc.compiler.detection.decoders import Detections, decode, get_decoder
from detc.compiler.detection.spec import ModelSpec

#: how far a compiled box may be from the Python path's (issue #20: within 1 px)
BOX_TOLERANCE_PX = 1.0
#: detections at or above this score must agree one for one
STRICT_SCORE = 0.25

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def prepost_entry(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``prepost`` (None for an artifact without compiled pre/post-processing)."""
    entry = manifest.get("prepost")
    return dict(entry) if isinstance(entry, Mapping) else None


def artifact_feeds(
    entry: Mapping[str, Any], image: np.ndarray, tensor: np.ndarray, spec: ModelSpec
) -> dict[str, np.ndarray]:
    """What the artifact is fed for the uint8 RGB ``image`` (h, w, 3): the image itself when it
    preprocesses, else ``tensor``, the Python path's preprocessing of it."""
    if entry.get("preprocess"):
        return {"image": np.ascontiguousarray(image, dtype=np.uint8)}
    return {spec.input_name: tensor}


def artifact_detections(
    entry: Mapping[str, Any],
    outputs: Mapping[str, np.ndarray],
    transform: LetterboxTransform,
    spec: ModelSpec,
) -> Detections:
    """The artifact's detections in original-image pixels."""
    if not entry.get("nms"):
        found = decode(get_decoder(spec.decoder), dict(outputs), spec)
        return found.with_boxes(transform.boxes_to_original(found.boxes))
    count = int(np.asarray(outputs["count"]).reshape(-1)[0])
    found = Detections(
        np.asarray(outputs["boxes"])[:count],
        np.asarray(outputs["scores"])[:count],
        np.asarray(outputs["classes"])[:count],
    )
    if entry.get("preprocess"):
        return found  # mapped back and clipped inside the library
    return found.with_boxes(transform.boxes_to_original(found.boxes))


def reference_detections(
    reference: Runner, tensor: np.ndarray, transform: LetterboxTransform, spec: ModelSpec
) -> Detections:
    """The float reference path on a preprocessed image: the reference model, the Python
    decoder, boxes mapped to original pixels."""
    outputs = dict(reference({spec.input_name: tensor}))
    found = decode(get_decoder(spec.decoder), outputs, spec)
    return found.with_boxes(transform.boxes_to_original(found.boxes))


@dataclass(frozen=True)
class ImageComparison:
    """One image: the reference's and the artifact's detections compared."""

    label: str  # the image (a file name, or its size)
    reference_count: int
    candidate_count: int
    #: detections at or above STRICT_SCORE in either: counts, classes in order, boxes
    strict_count: tuple[int, int]
    strict_classes_equal: bool
    strict_max_box_diff: float
    #: every detection, position by position (low scores may legitimately swap)
    classes_equal: bool
    max_box_diff: float
    max_score_diff: float

    @property
    def ok(self) -> bool:
        return (
            self.strict_count[0] == self.strict_count[1]
            and self.strict_classes_equal
            and self.strict_max_box_diff <= BOX_TOLERANCE_PX
        )

    @property
    def identical_lists(self) -> bool:
        return (
            self.reference_count == self.candidate_count
            and self.classes_equal
            and self.max_box_diff <= BOX_TOLERANCE_PX
        )

    def describe(self) -> str:
        return (
            f"{self.label}: {self.reference_count} vs {self.candidate_count} detections, "
            f"score >= {STRICT_SCORE}: {self.strict_count[0]} vs {self.strict_count[1]}, "
            f"classes {'equal' if self.strict_classes_equal else 'DIFFER'}, max box diff "
            f"{self.strict_max_box_diff:.3g} px"
        )


def _max_box_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def compare_detections(label: str, reference: Detections, candidate: Detections) -> ImageComparison:
    """Position by position: counts, classes in order, box and score differences."""
    both = min(len(reference), len(candidate))
    strong_ref = reference.take(reference.scores >= STRICT_SCORE)
    strong_cand = candidate.take(candidate.scores >= STRICT_SCORE)
    strict = min(len(strong_ref), len(strong_cand))
    return ImageComparison(
        label=label,
        reference_count=len(reference),
        candidate_count=len(candidate),
        strict_count=(len(strong_ref), len(strong_cand)),
        strict_classes_equal=bool(
            len(strong_ref) == len(strong_cand)
            and np.array_equal(strong_ref.class_ids, strong_cand.class_ids)
        ),
        strict_max_box_diff=_max_box_diff(strong_ref.boxes[:strict], strong_cand.boxes[:strict]),
        classes_equal=bool(
            len(reference) == len(candidate)
            and np.array_equal(reference.class_ids, candidate.class_ids)
        ),
        max_box_diff=_max_box_diff(reference.boxes[:both], candidate.boxes[:both]),
        max_score_diff=float(
            np.abs(reference.scores[:both] - candidate.scores[:both]).max() if both else 0.0
        ),
    )


@dataclass
class PrepostComparison:
    """Every image compared; :meth:`lines` is what ``detc verify`` prints."""

    entry: dict[str, Any]
    images: list[ImageComparison] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(image.ok for image in self.images)

    @property
    def mismatches(self) -> list[ImageComparison]:
        return [image for image in self.images if not image.ok]

    def lines(self) -> list[str]:
        stages = [
            name
            for name, on in (
                ("preprocess", self.entry.get("preprocess")),
                ("nms", self.entry.get("nms")),
            )
            if on
        ]
        identical = sum(image.identical_lists for image in self.images)
        worst = max((image.strict_max_box_diff for image in self.images), default=0.0)
        lines = [
            f"compiled {' + '.join(stages)}: detections against the float reference path "
            f"(onnxruntime + Python preprocess/decoder) on {len(self.images)} image(s)",
            f"  score >= {STRICT_SCORE}: {len(self.images) - len(self.mismatches)}/"
            f"{len(self.images)} images agree (same count, classes in order, boxes within "
            f"{BOX_TOLERANCE_PX:g} px; max box diff {worst:.3g} px)",
            f"  all detections (score floor {self.entry.get('score_threshold', 'spec')}): "
            f"{identical}/{len(self.images)} images give identical lists",
        ]
        lines += [f"  MISMATCH {image.describe()}" for image in self.mismatches[:10]]
        return lines


def compare_on_images(
    entry: Mapping[str, Any],
    spec: ModelSpec,
    reference: Runner,
    candidate: Runner,
    images: Sequence[tuple[str, np.ndarray]],
) -> PrepostComparison:
    """Run both paths on every (label, uint8 RGB image) and compare their detections."""
    return run_prepost_images(
        entry, spec, reference, lambda feeds_list: [candidate(f) for f in feeds_list], images
    )


def synthetic_images(spec: ModelSpec, seed: int, count: int) -> list[tuple[str, np.ndarray]]:
    """Seeded noise images of varied sizes and aspect ratios around the model's input size:
    exactly the input, smaller, odd, portrait, landscape (what verify runs without --data)."""
    rng = np.random.default_rng(seed)
    height, width = spec.input_size
    sizes = [
        (height, width),
        (max(height // 2 + 1, 1), max(width // 3 + 1, 1)),
        (height * 3 // 2 + 1, width // 2 + 3),
        (height // 2 + 7, width * 2 - 1),
        (height + 13, width + 29),
    ]
    images = []
    for index in range(count):
        h, w = sizes[index % len(sizes)]
        # smooth noise: blobs a detector may fire on, not per-pixel static
        coarse = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3)).astype(np.float64)
        rows = np.linspace(0, coarse.shape[0] - 1, h).round().astype(int)
        cols = np.linspace(0, coarse.shape[1] - 1, w).round().astype(int)
        image = coarse[rows][:, cols] + rng.normal(0, 12, (h, w, 3))
        images.append((f"synthetic {h}x{w}", np.clip(image, 0, 255).astype(np.uint8)))
    return images


@dataclass
class PrepostVerification:
    """What ``detc verify`` reports for an artifact with compiled pre/post-processing, in place
    of the tensor comparison (same surface: ``ok``, ``to_dict``, ``table``, ``notes``)."""

    comparison: PrepostComparison
    inputs: str  # where the images came from

    @property
    def ok(self) -> bool:
        return self.comparison.ok

    @property
    def notes(self) -> list[str]:
        return [
            "raw output tensors are not compared: the library's input is an image and/or its "
            "outputs are detections"
        ]

    def table(self) -> str:
        return "\n".join(self.comparison.lines())

    def to_dict(self) -> dict[str, Any]:
        return {
            "prepost": self.comparison.entry,
            "inputs": self.inputs,
            "ok": self.ok,
            "box_tolerance_px": BOX_TOLERANCE_PX,
            "strict_score": STRICT_SCORE,
            "images": [
                {
                    "image": image.label,
                    "ok": image.ok,
                    "identical_lists": image.identical_lists,
                    "reference_count": image.reference_count,
                    "candidate_count": image.candidate_count,
                    "strict_count": list(image.strict_count),
                    "strict_max_box_diff": image.strict_max_box_diff,
                    "max_box_diff": image.max_box_diff,
                    "max_score_diff": image.max_score_diff,
                }
                for image in self.comparison.images
            ],
        }


BatchRunner = Callable[[Sequence[Mapping[str, np.ndarray]]], Sequence[Mapping[str, np.ndarray]]]


def run_prepost_images(
    entry: Mapping[str, Any],
    spec: ModelSpec,
    reference: Runner,
    candidate: BatchRunner,
    images: Sequence[tuple[str, np.ndarray]],
) -> PrepostComparison:
    """:func:`compare_on_images` with the artifact run once over every image (one batch: an
    emulated or remote artifact pays its start-up once)."""
    from PIL import Image

    # the Python preprocessing once per image: the reference reads it, and so does the artifact
    # when it does not preprocess itself
    prepared = [preprocess(Image.fromarray(image), spec) for _, image in images]
    outputs = candidate(
        [
            artifact_feeds(entry, image, tensor, spec)
            for (_, image), (tensor, _) in zip(images, prepared, strict=True)
        ]
    )
    comparison = PrepostComparison(dict(entry))
    for (label, _), (tensor, transform), produced in zip(images, prepared, outputs, strict=True):
        expected = reference_detections(reference, tensor, transform, spec)
        found = artifact_detections(entry, produced, transform, spec)
        comparison.images.append(compare_detections(label, expected, found))
    return comparison


def evaluate_prepost_dataset(
    entry: Mapping[str, Any],
    spec: ModelSpec,
    reference: Runner,
    candidate: BatchRunner,
    dataset: Any,
    *,
    max_images: int | None,
    reference_label: str,
    candidate_label: str,
) -> tuple[Any, PrepostComparison]:
    """Both paths on every image of a COCO ``dataset``: the detection report (mAP of each,
    agreement) and the strict per-image comparison."""
    from detc.compiler.detection.datasets import load_image
    from detc.compiler.detection.report import DetectionComparison

    samples = list(dataset.samples(spec, max_images))
    feeds_list = []
    for sample in samples:
        if entry.get("preprocess"):
            feeds_list.append({"image": np.asarray(load_image(sample.path), dtype=np.uint8)})
        else:
            feeds_list.append({spec.input_name: sample.tensor})
    produced = candidate(feeds_list)
    detections = DetectionComparison(spec.decoder, spec, compare_tensors=False)
    strict = PrepostComparison(dict(entry))
    for sample, outputs in zip(samples, produced, strict=True):
        raw = dict(reference({spec.input_name: sample.tensor}))
        expected = decode(get_decoder(spec.decoder), raw, spec)
        expected = expected.with_boxes(sample.transform.boxes_to_original(expected.boxes))
        found = artifact_detections(entry, outputs, sample.transform, spec)
        detections.add(sample, raw, {}, reference_dets=expected, candidate_dets=found)
        strict.images.append(compare_detections(sample.path.name, expected, found))
    report = detections.report(
        dataset, reference_label=reference_label, candidate_label=candidate_label
    )
    return report, strict
