"""Labeled fine-tuning: YOLOv5's detection loss on annotated images, beside the distillation.

A user who has annotations (a COCO-format dataset, the layout ``--data`` reads) can let the
student learn from them as the original was trained, not only from the teacher. The loss is
YOLOv5's, computed on the *decoded* rows ``(cx, cy, w, h, objectness, class scores...)`` in
input pixels, so no anchor table has to be read out of the graph:

* where each row's prediction sits is measured once from the decode step itself: raw heads of
  zero decode to each row's cell centre and anchor size (``(2 sigmoid(0) - 0.5 + grid) * stride``
  is the cell centre, ``(2 sigmoid(0))^2 * anchor`` the anchor), raw heads of a large value to
  the centre plus one stride;
* a box is learned by the rows whose cell centre lies within one stride of its centre (the cell
  and its nearest neighbours, as YOLOv5 assigns) and whose anchor is within 4x of its size;
* box: 1 - IoU of the assigned rows with their box; objectness: binary cross-entropy against
  that IoU on assigned rows and 0 elsewhere (a mean per level, so the many small cells of P3 do
  not outweigh P5); classes: binary cross-entropy against the box's class on assigned rows;
  weighted 0.05 / 1.0 / 0.5 as YOLOv5's defaults weigh them.

Labeled images run whole (letterboxed to the model's input size), one at a time through the
decode step, whose reshapes are written for one image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError
from detc.passes.torch_graph import TorchGraph

#: YOLOv5's loss gains (hyp.scratch-low.yaml): box, objectness, classes
_BOX_GAIN, _OBJECT_GAIN, _CLASS_GAIN = 0.05, 1.0, 0.5
#: a box is learned only by anchors within this factor of its width and height (YOLOv5's anchor_t)
_ANCHOR_RATIO = 4.0
#: raw head value whose sigmoid is 1 in float32: the decoded centre moves by exactly one stride
_SATURATED = 40.0
_EPS = 1e-7


@dataclass(frozen=True)
class RowGeometry:
    """Where each decoded row predicts: cell centre and anchor (N, 2), stride and level (N,)."""

    centres: np.ndarray
    anchors: np.ndarray
    strides: np.ndarray
    levels: np.ndarray


def row_geometry(
    graph: TorchGraph,
    heads: dict[str, tuple[int, ...]],
    output_name: str,
    input_name: str,
    input_shape: tuple[int, ...],
    torch: Any,
) -> RowGeometry:
    """Each row's cell centre, anchor and stride, read off the decode step (see the module)."""

    def decoded(value: float) -> np.ndarray:
        given = {name: torch.full(shape, value) for name, shape in heads.items()}
        given[input_name] = torch.zeros(input_shape)
        with torch.no_grad():
            rows = graph.run(given, [output_name])[output_name]
        return np.asarray(rows.detach().numpy(), np.float64).reshape(-1, rows.shape[-1])

    neutral, saturated = decoded(0.0), decoded(_SATURATED)
    if neutral.shape[1] < 6:
        raise BadInputError(
            f"recover: labels= needs YOLOv5's decoded rows (box, objectness, classes); output "
            f"{output_name!r} has {neutral.shape[1]} values per row"
        )
    strides = saturated[:, 0] - neutral[:, 0]
    if not np.all(strides > 0):
        raise BadInputError(
            f"recover: labels= needs YOLOv5's decode (centres that move with the raw head); "
            f"output {output_name!r} does not decode that way"
        )
    _, levels = np.unique(np.round(strides, 3), return_inverse=True)
    return RowGeometry(neutral[:, 0:2], neutral[:, 2:4], strides, levels.reshape(-1))


@dataclass(frozen=True)
class LabeledImage:
    """One annotated image as the model reads it: uint8 pixels and (M, 5) class, x1, y1, x2, y2."""

    pixels: Any  # uint8 (1, 3, H, W)
    boxes: np.ndarray


def load_labeled(folder: Path, spec: Any, torch: Any) -> list[LabeledImage]:
    """Images of a COCO-format dataset letterboxed as the model reads them, their boxes mapped
    to input pixels and their categories to the model's class indices."""
    from detc.compiler.detection.datasets import CocoDataset
    from detc.compiler.detection.metrics import category_ids_for

    dataset = CocoDataset(folder, spec)
    class_of = {cid: index for index, cid in enumerate(category_ids_for(spec, dataset))}
    coco = dataset.coco()
    labeled = []
    for sample in dataset.samples(spec):
        rows = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[sample.image_id], iscrowd=False)):
            if int(ann["category_id"]) not in class_of:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 1 or h <= 1:
                continue
            box = sample.transform.boxes_to_input(np.array([[x, y, x + w, y + h]]))[0]
            rows.append([class_of[int(ann["category_id"])], *box.tolist()])
        pixels = np.clip(np.rint(sample.tensor / spec.scale), 0, 255).astype(np.uint8)
        labeled.append(
            LabeledImage(torch.from_numpy(pixels), np.array(rows, np.float64).reshape(-1, 5))
        )
    if not any(len(image.boxes) for image in labeled):
        raise BadInputError(f"recover: labels={folder} has no box of the model's classes")
    return labeled


def assign(boxes: np.ndarray, geometry: RowGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The rows that learn each box: (rows, index of their box), one box per row (the one whose
    size its anchor fits best)."""
    if not len(boxes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    centre = (boxes[:, 1:3] + boxes[:, 3:5]) / 2
    size = np.maximum(boxes[:, 3:5] - boxes[:, 1:3], _EPS)
    near = np.all(
        np.abs(geometry.centres[None, :, :] - centre[:, None, :]) < geometry.strides[None, :, None],
        axis=2,
    )
    ratio = np.maximum(
        geometry.anchors[None, :, :] / size[:, None, :], size[:, None, :] / geometry.anchors[None]
    ).max(axis=2)
    fit = np.where(near & (ratio < _ANCHOR_RATIO), ratio, np.inf)  # (boxes, rows)
    best = fit.argmin(axis=0)
    rows = np.nonzero(np.isfinite(fit[best, np.arange(fit.shape[1])]))[0]
    return rows, best[rows]


def _iou(torch: Any, predicted: Any, target: Any) -> Any:
    """IoU of (K, 4) centre-size boxes with (K, 4) corner boxes, row by row."""
    half = predicted[:, 2:4] / 2
    corners = torch.cat([predicted[:, 0:2] - half, predicted[:, 0:2] + half], dim=1)
    top_left = torch.maximum(corners[:, 0:2], target[:, 0:2])
    bottom_right = torch.minimum(corners[:, 2:4], target[:, 2:4])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_p = (corners[:, 2:4] - corners[:, 0:2]).prod(dim=1)
    area_t = (target[:, 2:4] - target[:, 0:2]).prod(dim=1)
    return inter / (area_p + area_t - inter + _EPS)


def _bce(torch: Any, probability: Any, target: Any) -> Any:
    p = probability.clamp(_EPS, 1 - _EPS)
    return -(target * p.log() + (1 - target) * (1 - p).log())


def detection_loss(
    torch: Any, rows: Any, boxes: np.ndarray, geometry: RowGeometry, classes: int
) -> Any:
    """YOLOv5's loss of one image's decoded (N, 5 + classes) rows against its boxes."""
    chosen, owner = assign(boxes, geometry)
    objectness_target = torch.zeros(rows.shape[0])
    loss = rows.new_zeros(())
    if len(chosen):
        index = torch.from_numpy(chosen)
        target = torch.from_numpy(boxes[owner, 1:5]).float()
        iou = _iou(torch, rows[index, 0:4], target)
        loss = loss + _BOX_GAIN * (1 - iou).mean()
        objectness_target[index] = iou.detach().clamp(min=0)
        one_hot = torch.zeros(len(chosen), classes)
        one_hot[torch.arange(len(chosen)), torch.from_numpy(boxes[owner, 0].astype(np.int64))] = 1
        loss = loss + _CLASS_GAIN * _bce(torch, rows[index, 5:], one_hot).mean()
    per_row = _bce(torch, rows[:, 4], objectness_target)
    levels = torch.from_numpy(geometry.levels)
    level_means = [per_row[levels == level].mean() for level in np.unique(geometry.levels)]
    return loss + _OBJECT_GAIN * torch.stack(level_means).mean()


class LabeledLoss:
    """Draws annotated images and scores the student's detections on them (see the module)."""

    def __init__(
        self,
        images: Sequence[LabeledImage],
        student: TorchGraph,
        heads: Sequence[str],
        output_name: str,
        input_name: str,
        scale: float,
        seed: int,
        torch: Any,
    ) -> None:
        self.images = list(images)
        self.heads = list(heads)
        self.output_name = output_name
        self.input_name = input_name
        self.scale = scale
        self.torch = torch
        self.rng = np.random.default_rng(seed + 1)
        first = self.images[0].pixels.float() * scale
        with torch.no_grad():
            shapes = student.run({input_name: first}, self.heads)
        self.geometry = row_geometry(
            student,
            {name: tuple(value.shape) for name, value in shapes.items()},
            output_name,
            input_name,
            tuple(first.shape),
            torch,
        )

    def loss(self, student: TorchGraph, count: int) -> Any:
        """Mean detection loss over ``count`` images drawn at random (flipped half the time)."""
        total = []
        for index in self.rng.integers(0, len(self.images), count).tolist():
            image = self.images[index]
            inputs = image.pixels.float() * self.scale
            boxes = image.boxes
            if self.rng.random() < 0.5:
                width = inputs.shape[-1]
                inputs = inputs.flip(-1)
                boxes = boxes.copy()
                boxes[:, [1, 3]] = width - boxes[:, [3, 1]]
            rows = student.run({self.input_name: inputs}, [self.output_name])[self.output_name]
            rows = rows.reshape(-1, rows.shape[-1])
            total.append(detection_loss(self.torch, rows, boxes, self.geometry, rows.shape[1] - 5))
        return self.torch.stack(total).mean()
