"""COCO box mAP through pycocotools, from detc `Detections` in original-image pixels.

Class index → COCO category id: ``spec.category_ids`` when given, else the dataset's categories
ordered by id (COCO ids are not 0..79). pycocotools' progress prints are silenced.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from detc.compiler.detection.datasets import CocoDataset
from detc.compiler.detection.decoders import Detections
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError

#: pycocotools' default maxDets are (1, 10, 100); the headline figures use the last
_MAX_DETS_INDEX = 2


@dataclass(frozen=True)
class CocoMetrics:
    """COCO box metrics (fractions in [0, 1]); None where the evaluated images have no GT."""

    map: float  # AP@[.5:.95], area all, 100 detections per image
    map50: float
    map75: float
    map_small: float | None
    map_medium: float | None
    map_large: float | None
    per_class: dict[str, float | None] = field(default_factory=dict)  # AP@[.5:.95] by name
    num_images: int = 0
    num_detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def category_ids_for(spec: ModelSpec, dataset: CocoDataset) -> tuple[int, ...]:
    """Category id of each class index.

    ``spec.category_ids`` if set; else the dataset's categories ordered by id. When the spec
    names a different number of classes than the dataset has categories, the names are matched
    instead (every class name must be a category name), since order then means nothing.
    """
    if spec.category_ids is not None:
        return spec.category_ids
    dataset_ids = dataset.category_ids
    if not spec.class_names or len(spec.class_names) == len(dataset_ids):
        return dataset_ids
    by_name = {name: cid for cid, name in zip(dataset_ids, dataset.category_names, strict=True)}
    unknown = [name for name in spec.class_names if name not in by_name]
    if unknown:
        raise BadInputError(
            f"model has {len(spec.class_names)} classes but {dataset.annotation_path} has "
            f"{len(dataset_ids)} categories and no category named {unknown[0]!r}: give "
            "category_ids in the model spec"
        )
    return tuple(by_name[name] for name in spec.class_names)


def _results(
    detections: Mapping[int, Detections], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    lookup = np.asarray(category_ids, dtype=np.int64)
    for image_id, dets in detections.items():
        if not len(dets):
            continue
        bad = (dets.class_ids < 0) | (dets.class_ids >= len(lookup))
        if bad.any():
            raise BadInputError(
                f"class index {int(dets.class_ids[bad][0])} has no dataset category "
                f"({len(lookup)} known): give category_ids in the model spec"
            )
        xywh = dets.boxes.astype(np.float64).copy()
        xywh[:, 2:] -= xywh[:, :2]
        cats = lookup[dets.class_ids]
        for box, score, cat in zip(xywh.tolist(), dets.scores.tolist(), cats.tolist(), strict=True):
            results.append(
                {"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score}
            )
    return results


def _empty_results(ground_truth: Any) -> Any:
    """A results COCO with no detections (``loadRes`` cannot take an empty list)."""
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {
        "images": list(ground_truth.dataset["images"]),
        "categories": list(ground_truth.dataset["categories"]),
        "annotations": [],
    }
    empty.createIndex()
    return empty


def _ap(value: float) -> float | None:
    return None if value < 0 else float(value)


def evaluate_coco(
    detections: Mapping[int, Detections],
    dataset: CocoDataset,
    category_ids: Sequence[int] | None = None,
) -> CocoMetrics:
    """mAP of ``detections`` (image id → Detections, boxes in original pixels) on ``dataset``.

    Only the images in ``detections`` are evaluated (an image with no detections must still be
    present, with empty Detections, or its objects are not counted as missed).
    """
    from pycocotools.cocoeval import COCOeval

    if category_ids is None:
        category_ids = dataset.category_ids
    image_ids = sorted(int(i) for i in detections)
    ground_truth = dataset.coco()
    unknown = [i for i in image_ids if i not in ground_truth.imgs]
    if unknown:
        raise BadInputError(
            f"image id {unknown[0]} is not in {dataset.annotation_path}: detections and ground "
            "truth come from different datasets"
        )
    if not ground_truth.getAnnIds(imgIds=image_ids, iscrowd=None):
        raise BadInputError(
            f"{dataset.annotation_path} has no annotations for the {len(image_ids)} evaluated "
            "image(s): mAP is undefined"
        )
    results = _results(detections, category_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        predicted = ground_truth.loadRes(results) if results else _empty_results(ground_truth)
        evaluator = COCOeval(ground_truth, predicted, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    precision = evaluator.eval["precision"]  # [iou T, recall R, category K, area A, maxDets M]
    names = {int(c["id"]): str(c["name"]) for c in dataset.categories}
    per_class: dict[str, float | None] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        curve = precision[:, :, k, 0, _MAX_DETS_INDEX]
        valid = curve[curve > -1]
        per_class[names.get(int(cat_id), str(cat_id))] = float(valid.mean()) if valid.size else None
    return CocoMetrics(
        map=max(float(stats[0]), 0.0),
        map50=max(float(stats[1]), 0.0),
        map75=max(float(stats[2]), 0.0),
        map_small=_ap(stats[3]),
        map_medium=_ap(stats[4]),
        map_large=_ap(stats[5]),
        per_class=per_class,
        num_images=len(image_ids),
        num_detections=len(results),
    )
