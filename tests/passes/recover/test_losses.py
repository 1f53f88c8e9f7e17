"""recover's losses: zero where the student matches, and weighted as detection needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from detc.passes.recover.losses import HeadLayout, LossTarget, head_loss, yolo_head_layout

if TYPE_CHECKING:  # the annotations' torch; at run time, importorskip's
    import torch

torch = pytest.importorskip("torch")

LAYOUT = HeadLayout(anchors=1, classes=2)  # x, y, w, h, objectness, 2 classes
HEAD = LossTarget("head", head=True, sigmoid=True, layout=LAYOUT)


def _head(objectness: float) -> torch.Tensor:
    """One image, a 2 x 2 grid; cell (0, 0) holds an object with this objectness logit."""
    logits = torch.full((1, 7, 2, 2), -8.0)
    logits[0, 0:4] = 0.0
    logits[0, 4, 0, 0] = objectness
    return logits


def _loss(student: torch.Tensor, teacher: torch.Tensor) -> float:
    return float(head_loss(torch, {"head": student}, {"head": teacher}, [HEAD]))


def test_a_student_equal_to_the_teacher_has_zero_loss() -> None:
    teacher = _head(4.0)
    assert _loss(teacher.clone(), teacher) == pytest.approx(0.0, abs=1e-5)


def test_class_and_box_errors_count_only_where_the_teacher_sees_an_object() -> None:
    teacher = _head(4.0)
    on_object, on_background = teacher.clone(), teacher.clone()
    on_object[0, 5, 0, 0] += 3.0  # a class score changed in the object's cell
    on_background[0, 5, 1, 1] += 3.0  # the same change in an empty cell
    assert _loss(on_object, teacher) > 100 * _loss(on_background, teacher)


def test_an_objectness_error_on_background_counts() -> None:
    teacher = _head(4.0)
    false_positive = teacher.clone()
    false_positive[0, 4, 1, 1] = 4.0  # the student sees an object where the teacher does not
    assert _loss(false_positive, teacher) > 1.0


def test_the_yolo_layout_is_recognised_only_where_it_fits() -> None:
    assert yolo_head_layout(255, "yolov5", 80) == HeadLayout(3, 80)
    assert yolo_head_layout(256, "yolov5", 80) is None
    assert yolo_head_layout(255, "yolox", 80) is None
