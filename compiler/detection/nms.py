"""Non-maximum suppression and box IoU in numpy.

Class-aware NMS shifts every box by ``class_id * offset`` so boxes of different classes can
never overlap, then runs one greedy pass: the same result as a per-class loop, in one sweep.
"""

from __future__ import annotations

import numpy as np


def box_area(xyxy: np.ndarray) -> np.ndarray:
    """Areas of (N, 4) x1,y1,x2,y2 boxes; inverted boxes have area 0."""
    boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0]).clip(min=0.0) * (boxes[:, 3] - boxes[:, 1]).clip(min=0.0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) x1,y1,x2,y2 boxes → (N, M) float64; 0 where empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clip(min=0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0.0, inter / union, 0.0)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    class_ids: np.ndarray | None = None,
    max_keep: int | None = None,
) -> np.ndarray:
    """Greedy NMS; indices of kept boxes in descending score order.

    A box is suppressed when its IoU with a kept, higher-scoring box (of the same class when
    ``class_ids`` is given) is strictly above ``iou_threshold``. Equal scores keep input order.
    Greedy NMS emits boxes in score order, so stopping after ``max_keep`` gives exactly the top
    ``max_keep`` of the full result.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"nms: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    if class_ids is not None:
        class_ids = np.asarray(class_ids).reshape(-1)
        # Offsetting by more than the whole coordinate span separates classes completely.
        span = float(np.abs(boxes).max()) * 2.0 + 1.0
        boxes = boxes + (class_ids.astype(np.float64) * span)[:, None]
    limit = boxes.shape[0] if max_keep is None else max(int(max_keep), 0)

    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1).clip(min=0.0) * (y2 - y1).clip(min=0.0)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        inter_w = (np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])).clip(min=0.0)
        inter_h = (np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])).clip(min=0.0)
        inter = inter_w * inter_h
        union = areas[best] + areas[rest] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0.0, inter / union, 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)
