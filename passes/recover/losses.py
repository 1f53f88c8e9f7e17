"""What recovery minimises: an error per output that weighs what detection needs.

One pixel-scale norm over a YOLO head is blind to where accuracy goes: box coordinates in pixels
dwarf objectness and class scores, which decide which detections survive the score floor and
NMS. So each part of a head is compared in the space that matters for it:

* objectness and class scores as probabilities: the KL divergence of the student's Bernoulli
  from the teacher's (binary cross-entropy against the teacher's probability, less its entropy,
  so a perfect student scores 0);
* box centres in grid cells (YOLOv5 decodes ``(2 sigmoid - 0.5 + grid) * stride``: an error of
  one stride is 1 whatever the level) and box sizes in anchor units (``(2 sigmoid)^2 * anchor``);
* box and class errors count where the teacher sees an object (weighted by its objectness);
  every term is divided by the teacher's expected object count, so an image full of background
  does not dilute the few cells that make detections.

Features (Conv outputs the student shares with the teacher) are compared by their squared error
relative to the teacher's per-channel variance, so wide early layers do not drown the heads.
A head whose layout is not YOLOv5's is compared as probabilities after its Sigmoid when it has
one, else as a feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_EPS = 1e-6


@dataclass(frozen=True)
class HeadLayout:
    """YOLOv5's raw head: per anchor, x, y, w, h, objectness and ``classes`` class scores."""

    anchors: int
    classes: int

    @property
    def per_anchor(self) -> int:
        return 5 + self.classes


def yolo_head_layout(channels: int, decoder: str, classes: int) -> HeadLayout | None:
    """The layout of a head Conv with ``channels`` outputs, or None when it is not YOLOv5's."""
    if decoder != "yolov5" or classes < 1 or channels % (5 + classes):
        return None
    return HeadLayout(channels // (5 + classes), classes)


@dataclass(frozen=True)
class LossTarget:
    """A value the student must reproduce, and how it is compared."""

    name: str
    head: bool
    sigmoid: bool  # a head read through a Sigmoid
    layout: HeadLayout | None  # a YOLOv5 head: compared part by part


def _bernoulli_kl(torch: Any, logits: Any, target: Any) -> Any:
    """KL(teacher || student) of Bernoulli variables, elementwise; 0 where they agree."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    clamped = target.clamp(_EPS, 1 - _EPS)
    entropy = -(clamped * clamped.log() + (1 - clamped) * (1 - clamped).log())
    return bce - entropy


@dataclass
class HeadTerms:
    """Sums over the cells of one or more YOLOv5 heads, and the expected object count."""

    box: Any = 0.0
    objectness: Any = 0.0
    classes: Any = 0.0
    objects: Any = 0.0

    def add(self, torch: Any, student: Any, teacher: Any, layout: HeadLayout) -> None:
        batch, _, rows, cols = teacher.shape
        shape = (batch, layout.anchors, layout.per_anchor, rows, cols)
        s, t = student.reshape(shape), teacher.reshape(shape)
        ps, pt = torch.sigmoid(s), torch.sigmoid(t)
        weight = pt[:, :, 4]
        centre = ((2 * ps[:, :, 0:2] - 2 * pt[:, :, 0:2]) ** 2).sum(2)
        size = ((4 * ps[:, :, 2:4] ** 2 - 4 * pt[:, :, 2:4] ** 2) ** 2).sum(2)
        self.box = self.box + ((centre + size) * weight).sum()
        self.objectness = self.objectness + _bernoulli_kl(torch, s[:, :, 4], weight).sum()
        class_error = _bernoulli_kl(torch, s[:, :, 5:], pt[:, :, 5:]).sum(2)
        self.classes = self.classes + (class_error * weight).sum()
        self.objects = self.objects + weight.sum()

    def total(self) -> Any:
        count = self.objects + 1.0
        return (self.box + self.objectness + self.classes) / count


def feature_error(torch: Any, student: Any, teacher: Any) -> Any:
    """Squared error relative to the teacher's mean per-channel variance."""
    spread = teacher.var(dim=(0, 2, 3)).mean() if teacher.dim() == 4 else teacher.var()
    return ((student - teacher) ** 2).mean() / (spread + 1e-8)


def head_loss(
    torch: Any,
    student: Mapping[str, Any],
    teacher: Mapping[str, Any],
    targets: Sequence[LossTarget],
) -> Any:
    """The heads' error: YOLOv5 heads part by part, others as probabilities or features."""
    yolo = HeadTerms()
    others: list[Any] = []
    for target in targets:
        if not target.head:
            continue
        s, t = student[target.name], teacher[target.name]
        if target.layout is not None:
            yolo.add(torch, s, t, target.layout)
        elif target.sigmoid:
            others.append(_bernoulli_kl(torch, s, torch.sigmoid(t)).mean())
        else:
            others.append(feature_error(torch, s, t))
    total = yolo.total() if any(t.head and t.layout for t in targets) else 0.0
    if others:
        total = total + torch.stack(others).mean()
    return total


def features_loss(
    torch: Any,
    student: Mapping[str, Any],
    teacher: Mapping[str, Any],
    targets: Sequence[LossTarget],
) -> Any:
    """Mean relative error over the feature targets (0.0 without any)."""
    terms = [feature_error(torch, student[t.name], teacher[t.name]) for t in targets if not t.head]
    return torch.stack(terms).mean() if terms else 0.0


def target_loss(torch: Any, student: Any, teacher: Any, target: LossTarget) -> Any:
    """One target's own error (what block-wise reconstruction fits)."""
    return (
        head_loss(torch, {target.name: student}, {target.name: teacher}, [target])
        if (target.head)
        else feature_error(torch, student, teacher)
    )
