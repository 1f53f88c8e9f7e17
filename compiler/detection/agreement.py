"""Box-level agreement between a reference and a candidate run of the same detector.

mAP can hide differences that cancel out; this counts them box by box. Only boxes at or above
a *report* score threshold (default 0.25, a typical deployment threshold) are compared, so the
thousands of near-zero boxes kept for mAP do not drown the signal: a "lost" box is one a user of
the reference would see and a user of the candidate would not.

Matching is greedy in descending reference score: each reference box takes the unmatched
candidate box of the same class with the highest IoU ≥ ``iou_threshold``; failing that, the best
candidate of another class with IoU ≥ ``iou_threshold`` is taken and counted as a class flip.

:func:`map_against_reference` sums the same comparison up in one number where no labels exist:
the candidate's COCO-style mAP with the reference's confident detections as ground truth (prune's
trial cuts and recover's held-out checks are judged by it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detc.compiler.detection.decoders import Detections
from detc.compiler.detection.nms import box_iou

DEFAULT_REPORT_SCORE = 0.25
DEFAULT_MATCH_IOU = 0.5
#: a reference detection from this score up is a pseudo ground truth of map_against_reference
CONFIDENT_SCORE = 0.25
_MAP_IOUS = np.linspace(0.5, 0.95, 10)


@dataclass(frozen=True)
class ImageAgreement:
    """Agreement on one image. ``matched`` counts same-class matches only."""

    image_id: int
    reference_boxes: int
    candidate_boxes: int
    matched: int
    class_flips: int
    lost: int  # reference boxes with no candidate box at IoU ≥ threshold
    extra: int  # candidate boxes no reference box took
    matched_ious: tuple[float, ...] = ()  # same-class matches
    score_drifts: tuple[float, ...] = ()  # |candidate - reference| score, same-class matches

    @property
    def agreement(self) -> float:
        """matched / (matched + flips + lost + extra); 1.0 when neither run reports a box."""
        total = self.matched + self.class_flips + self.lost + self.extra
        return 1.0 if total == 0 else self.matched / total

    @property
    def identical(self) -> bool:
        return self.class_flips == 0 and self.lost == 0 and self.extra == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "reference_boxes": self.reference_boxes,
            "candidate_boxes": self.candidate_boxes,
            "matched": self.matched,
            "class_flips": self.class_flips,
            "lost": self.lost,
            "extra": self.extra,
            "agreement": self.agreement,
            "min_iou": min(self.matched_ious) if self.matched_ious else None,
            "max_score_drift": max(self.score_drifts) if self.score_drifts else None,
        }


def match_detections(
    reference: Detections,
    candidate: Detections,
    *,
    image_id: int = 0,
    score_threshold: float = DEFAULT_REPORT_SCORE,
    iou_threshold: float = DEFAULT_MATCH_IOU,
) -> ImageAgreement:
    """Match ``candidate`` boxes to ``reference`` boxes of one image (see the module doc)."""
    ref = reference.above(score_threshold)
    cand = candidate.above(score_threshold)
    order = np.argsort(-ref.scores, kind="stable")
    ious = box_iou(ref.boxes, cand.boxes)
    same_class = ref.class_ids[:, None] == cand.class_ids[None, :]
    taken = np.zeros(len(cand), dtype=bool)
    matched_ious: list[float] = []
    drifts: list[float] = []
    flips = lost = 0
    for r in order:
        eligible = (ious[r] >= iou_threshold) & ~taken
        same = eligible & same_class[r]
        if same.any():
            c = int(np.argmax(np.where(same, ious[r], -1.0)))
            matched_ious.append(float(ious[r, c]))
            drifts.append(abs(float(cand.scores[c]) - float(ref.scores[r])))
        elif eligible.any():
            c = int(np.argmax(np.where(eligible, ious[r], -1.0)))
            flips += 1
        else:
            lost += 1
            continue
        taken[c] = True
    return ImageAgreement(
        image_id=int(image_id),
        reference_boxes=len(ref),
        candidate_boxes=len(cand),
        matched=len(matched_ious),
        class_flips=flips,
        lost=lost,
        extra=int((~taken).sum()),
        matched_ious=tuple(matched_ious),
        score_drifts=tuple(drifts),
    )


@dataclass(frozen=True)
class AgreementSummary:
    """Agreement over a whole dataset."""

    images: int
    images_identical: int  # no flip, lost or extra box
    reference_boxes: int
    candidate_boxes: int
    matched: int
    class_flips: int
    lost: int
    extra: int
    mean_iou: float | None
    min_iou: float | None
    mean_score_drift: float | None
    max_score_drift: float | None
    p99_score_drift: float | None
    score_threshold: float
    iou_threshold: float
    score_drifts: tuple[float, ...] = field(default=(), repr=False)  # for the histogram

    @property
    def agreement(self) -> float:
        total = self.matched + self.class_flips + self.lost + self.extra
        return 1.0 if total == 0 else self.matched / total

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "score_drifts"}
        out["agreement"] = self.agreement
        return out


def aggregate_agreement(
    per_image: Sequence[ImageAgreement],
    *,
    score_threshold: float = DEFAULT_REPORT_SCORE,
    iou_threshold: float = DEFAULT_MATCH_IOU,
) -> AgreementSummary:
    """Totals, IoU and score-drift statistics over images (thresholds recorded, not applied)."""
    ious = np.asarray([v for a in per_image for v in a.matched_ious], dtype=np.float64)
    drifts = np.asarray([v for a in per_image for v in a.score_drifts], dtype=np.float64)
    return AgreementSummary(
        images=len(per_image),
        images_identical=sum(a.identical for a in per_image),
        reference_boxes=sum(a.reference_boxes for a in per_image),
        candidate_boxes=sum(a.candidate_boxes for a in per_image),
        matched=sum(a.matched for a in per_image),
        class_flips=sum(a.class_flips for a in per_image),
        lost=sum(a.lost for a in per_image),
        extra=sum(a.extra for a in per_image),
        mean_iou=float(ious.mean()) if ious.size else None,
        min_iou=float(ious.min()) if ious.size else None,
        mean_score_drift=float(drifts.mean()) if drifts.size else None,
        max_score_drift=float(drifts.max()) if drifts.size else None,
        p99_score_drift=float(np.percentile(drifts, 99)) if drifts.size else None,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        score_drifts=tuple(drifts.tolist()),
    )


def confident_truths(found: Sequence[Detections]) -> list[Detections] | None:
    """The reference's detections from :data:`CONFIDENT_SCORE` up, per image: the ground truth
    of :func:`map_against_reference`; None where no image has one (nothing to agree on)."""
    truths = [d.above(CONFIDENT_SCORE) for d in found]
    return truths if any(len(t) for t in truths) else None


def map_against_reference(truths: Sequence[Detections], found: Sequence[Detections]) -> float:
    """COCO-style mAP@[.5:.95] of ``found`` with ``truths`` as ground truth (classes apart).

    Detections go by falling score; each takes the best-overlapping truth of its class not yet
    taken at that IoU threshold; precision is interpolated at 101 recall points.
    """
    classes = np.unique(np.concatenate([t.class_ids for t in truths]))
    recall_points = np.linspace(0.0, 1.0, 101)
    precisions = []
    for cls in classes.tolist():
        total = sum(int((t.class_ids == cls).sum()) for t in truths)
        scores: list[np.ndarray] = []
        hits: list[np.ndarray] = []
        for truth, candidate in zip(truths, found, strict=True):
            boxes = candidate.boxes[candidate.class_ids == cls]
            order = np.argsort(-candidate.scores[candidate.class_ids == cls], kind="stable")
            boxes = boxes[order]
            scores.append(candidate.scores[candidate.class_ids == cls][order])
            targets = truth.boxes[truth.class_ids == cls]
            matched = np.zeros((len(_MAP_IOUS), len(boxes)), bool)
            if len(boxes) and len(targets):
                iou = box_iou(boxes, targets)
                for t, threshold in enumerate(_MAP_IOUS.tolist()):
                    taken = np.zeros(len(targets), bool)
                    for d in range(len(boxes)):
                        row = np.where(taken, -1.0, iou[d])
                        best = int(np.argmax(row))
                        if row[best] >= threshold:
                            taken[best] = True
                            matched[t, d] = True
            hits.append(matched)
        all_scores = np.concatenate(scores)
        order = np.argsort(-all_scores, kind="stable")
        all_hits = np.concatenate(hits, axis=1)[:, order]
        true_positives = np.cumsum(all_hits, axis=1)
        precision = true_positives / np.arange(1, all_hits.shape[1] + 1)
        recall = true_positives / total
        for t in range(len(_MAP_IOUS)):
            sampled = np.zeros(len(recall_points))
            if len(order):
                envelope = np.maximum.accumulate(precision[t][::-1])[::-1]
                index = np.searchsorted(recall[t], recall_points, side="left")
                valid = index < len(envelope)
                sampled[valid] = envelope[index[valid]]
            precisions.append(float(sampled.mean()))
    return float(np.mean(precisions)) if precisions else 1.0
