from __future__ import annotations

import numpy as np
import pytest

from detc.compiler.detection.agreement import (
    aggregate_agreement,
    map_against_reference,
    match_detections,
)
from detc.compiler.detection.decoders import Detections


def _dets(rows: list[tuple[int, float, float, float, float, float]]) -> Detections:
    """(class index, score, x1, y1, x2, y2) rows."""
    if not rows:
        return Detections.empty()
    array = np.asarray(rows, dtype=np.float64)
    return Detections(array[:, 2:], array[:, 1], array[:, 0].astype(int))


REFERENCE = _dets(
    [
        (0, 0.90, 0, 0, 10, 10),
        (1, 0.80, 20, 20, 40, 40),
        (2, 0.60, 50, 50, 60, 60),
        (0, 0.10, 70, 70, 80, 80),  # under the report threshold: ignored
    ]
)


def test_identical_runs_agree_fully() -> None:
    result = match_detections(REFERENCE, REFERENCE, image_id=7)
    assert (result.image_id, result.reference_boxes, result.candidate_boxes) == (7, 3, 3)
    assert (result.matched, result.lost, result.extra, result.class_flips) == (3, 0, 0, 0)
    assert result.agreement == 1.0 and result.identical
    assert result.matched_ious == (1.0, 1.0, 1.0) and result.score_drifts == (0.0, 0.0, 0.0)


def test_shifted_box_is_lost_and_extra() -> None:
    # box 2 moved 6 px right: overlap 4x10 = 40, union 160 → IoU 0.25 < 0.5
    candidate = _dets(
        [(0, 0.85, 0, 0, 10, 10), (1, 0.80, 20, 20, 40, 40), (2, 0.60, 56, 50, 66, 60)]
    )
    result = match_detections(REFERENCE, candidate)
    assert (result.matched, result.lost, result.extra, result.class_flips) == (2, 1, 1, 0)
    assert result.agreement == pytest.approx(2 / 4)
    np.testing.assert_allclose(result.score_drifts, [0.05, 0.0], atol=1e-6)


def test_same_box_other_class_is_a_flip() -> None:
    candidate = _dets(
        [(0, 0.90, 0, 0, 10, 10), (3, 0.80, 21, 20, 41, 40), (2, 0.60, 50, 50, 60, 60)]
    )
    result = match_detections(REFERENCE, candidate)
    assert (result.matched, result.lost, result.extra, result.class_flips) == (2, 0, 0, 1)
    assert not result.identical


def test_a_same_class_match_beats_a_better_overlap_of_another_class() -> None:
    reference = _dets([(0, 0.9, 0, 0, 10, 10)])
    candidate = _dets([(5, 0.9, 0, 0, 10, 10), (0, 0.8, 0, 0, 10, 8)])  # IoU 1.0 vs 0.8
    result = match_detections(reference, candidate)
    assert (result.matched, result.class_flips, result.extra) == (1, 0, 1)
    assert result.matched_ious == pytest.approx((0.8,))


def test_greedy_order_gives_the_candidate_to_the_higher_score() -> None:
    reference = _dets([(0, 0.5, 0, 0, 10, 10), (0, 0.9, 1, 0, 11, 10)])
    candidate = _dets([(0, 0.7, 0, 0, 10, 10)])
    result = match_detections(reference, candidate)
    # the 0.9 box takes the only candidate even though the 0.5 box overlaps it perfectly
    assert (result.matched, result.lost) == (1, 1)
    assert result.matched_ious == pytest.approx((90 / 110,))


def test_report_threshold_hides_low_scores_on_both_sides() -> None:
    reference = _dets([(0, 0.30, 0, 0, 10, 10)])
    candidate = _dets([(0, 0.20, 0, 0, 10, 10), (1, 0.1, 30, 30, 40, 40)])
    result = match_detections(reference, candidate)
    assert (result.lost, result.extra) == (1, 0)  # dropped under 0.25: the user no longer sees it
    assert match_detections(reference, candidate, score_threshold=0.15).matched == 1


def test_empty_images_agree() -> None:
    result = match_detections(Detections.empty(), Detections.empty())
    assert result.agreement == 1.0 and result.identical
    only_extra = match_detections(Detections.empty(), REFERENCE)
    assert (only_extra.extra, only_extra.agreement) == (3, 0.0)


def test_aggregate_sums_and_statistics() -> None:
    shifted = _dets([(0, 0.85, 0, 0, 10, 10), (1, 0.70, 20, 20, 40, 38), (2, 0.60, 56, 50, 66, 60)])
    per_image = [
        match_detections(REFERENCE, REFERENCE, image_id=1),
        match_detections(REFERENCE, shifted, image_id=2),
        match_detections(Detections.empty(), Detections.empty(), image_id=3),
    ]
    summary = aggregate_agreement(per_image)
    assert (summary.images, summary.images_identical) == (3, 2)
    assert (summary.reference_boxes, summary.candidate_boxes) == (6, 6)
    assert (summary.matched, summary.lost, summary.extra, summary.class_flips) == (5, 1, 1, 0)
    # IoUs: 1, 1, 1 (identical image) + 1 and 360/400 (shifted image)
    assert summary.mean_iou == pytest.approx((4 + 0.9) / 5)
    assert summary.min_iou == pytest.approx(0.9)
    assert summary.max_score_drift == pytest.approx(0.10, abs=1e-6)
    assert len(summary.score_drifts) == 5
    assert summary.agreement == pytest.approx(5 / 7)
    assert "score_drifts" not in summary.to_dict()


def test_aggregate_of_nothing() -> None:
    summary = aggregate_agreement([])
    assert summary.images == 0 and summary.mean_iou is None and summary.agreement == 1.0


def test_map_against_reference_is_coco_style_map_with_confident_reference_boxes_as_truth() -> None:
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 30]], np.float32)
    truths = [Detections(boxes, np.ones(3), np.array([0, 0, 1]))]
    same = [Detections(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]))]
    assert map_against_reference(truths, same) == 1.0
    # a false positive ranked below every true one leaves AP at 1; one missed box does not
    extra = Detections(np.vstack([boxes, [[80, 80, 90, 90]]]), [0.9, 0.8, 0.7, 0.1], [0, 0, 1, 0])
    assert map_against_reference(truths, [extra]) == 1.0
    missing = Detections(boxes[:2], [0.9, 0.8], [0, 0])
    assert map_against_reference(truths, [missing]) == pytest.approx(0.5)  # class 1 found nothing
    # a box shifted to IoU 0.8 with its truth counts at the thresholds 0.5 .. 0.8 only
    shifted = boxes.copy()
    shifted[2] = [50, 0, 60, 0 + 30 * 0.8]
    partial = map_against_reference(truths, [Detections(shifted, [0.9, 0.8, 0.7], [0, 0, 1])])
    assert partial == pytest.approx((1.0 + 7 / 10) / 2)
