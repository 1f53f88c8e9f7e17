from __future__ import annotations

import time

import numpy as np
import pytest

from detc.compiler.detection.nms import box_area, box_iou, nms


def test_box_iou_hand_computed() -> None:
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], dtype=np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], dtype=np.float32)
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    # overlap 1x1 = 1, union 4 + 4 - 1 = 7
    np.testing.assert_allclose(iou[0], [1 / 7, 1.0, 0.0])
    # [0,0,1,1] inside [0,0,2,2]: 1 / 4; no overlap with [1,1,3,3] beyond a corner point
    np.testing.assert_allclose(iou[1], [0.0, 0.25, 0.0])


def test_box_iou_degenerate_boxes_are_zero_not_nan() -> None:
    point = np.array([[3, 3, 3, 3]], dtype=np.float32)
    assert box_iou(point, point)[0, 0] == 0.0
    assert box_area(np.array([[4, 4, 2, 2]]))[0] == 0.0  # inverted box


def test_nms_suppresses_overlap_above_threshold_only() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    # IoU(box0, box1) = 81 / (100 + 100 - 81) = 0.6807
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.69).tolist() == [0, 1, 2]


def test_nms_keeps_box_at_exactly_the_threshold() -> None:
    boxes = np.array([[0, 0, 4, 1], [2, 0, 6, 1]], dtype=np.float64)  # IoU 2 / 6
    scores = np.array([0.9, 0.5])
    assert nms(boxes, scores, 1 / 3).tolist() == [0, 1]
    assert nms(boxes, scores, 0.33).tolist() == [0]


def test_nms_is_class_aware() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11]], dtype=np.float32)
    scores = np.array([0.9, 0.8])
    assert nms(boxes, scores, 0.5, class_ids=np.array([0, 0])).tolist() == [0]
    assert nms(boxes, scores, 0.5, class_ids=np.array([0, 3])).tolist() == [0, 1]


def test_nms_returns_descending_scores_and_empty_input() -> None:
    boxes = np.array([[20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float32)
    assert nms(boxes, np.array([0.2, 0.6]), 0.5).tolist() == [1, 0]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def _naive_per_class_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float):
    """Plain-Python greedy NMS, one class at a time, merged by score: the slow definition."""
    kept: list[int] = []
    for cls in np.unique(classes):
        members = sorted(np.nonzero(classes == cls)[0].tolist(), key=lambda i: (-scores[i], i))
        chosen: list[int] = []
        for i in members:
            if all(box_iou(boxes[i], boxes[j])[0, 0] <= thr for j in chosen):
                chosen.append(i)
        kept.extend(chosen)
    return sorted(kept, key=lambda i: (-scores[i], i))


def test_nms_matches_a_naive_per_class_loop(rng: np.random.Generator) -> None:
    xy = rng.uniform(0, 100, size=(300, 2))
    wh = rng.uniform(5, 40, size=(300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(size=300)
    classes = rng.integers(0, 4, size=300)
    expected = _naive_per_class_nms(boxes, scores, classes, 0.45)
    assert nms(boxes, scores, 0.45, class_ids=classes).tolist() == expected
    # stopping early yields exactly the top of the full answer
    assert nms(boxes, scores, 0.45, class_ids=classes, max_keep=7).tolist() == expected[:7]


def test_nms_handles_a_yolo_sized_candidate_set(rng: np.random.Generator) -> None:
    count = 25_200
    xy = rng.uniform(0, 600, size=(count, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, size=(count, 2))], axis=1)
    scores = rng.uniform(size=count)
    classes = rng.integers(0, 80, size=count)
    start = time.perf_counter()
    keep = nms(boxes, scores, 0.65, class_ids=classes, max_keep=300)
    elapsed = time.perf_counter() - start
    assert len(keep) == 300
    assert np.all(np.diff(scores[keep]) <= 0)
    assert elapsed < 5.0, f"NMS over {count} candidates took {elapsed:.2f} s"


def test_nms_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        nms(np.zeros((2, 4)), np.zeros(3), 0.5)
