from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detc.compiler.detection.datasets import CocoDataset
from detc.compiler.detection.decoders import Detections
from detc.compiler.detection.metrics import category_ids_for, evaluate_coco
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError

# COCO category ids are not class indices: 1 → index 0, 3 → index 1, 7 → index 2 (by id)
CATEGORIES = [{"id": 7, "name": "truck"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
PERSON, CAR = 0, 1
GROUND_TRUTH = {  # image id → [(category id, x, y, w, h)]
    10: [(1, 0, 0, 10, 10), (3, 20, 20, 10, 10)],
    11: [(3, 5, 5, 10, 10)],
    12: [(1, 2, 3, 40, 50), (1, 50, 10, 30, 30), (3, 10, 60, 60, 30)],
}


def _dataset(root: Path) -> CocoDataset:
    (root / "images").mkdir(parents=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for image_id, objects in GROUND_TRUTH.items():
        Image.new("RGB", (100, 100)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 100, "height": 100})
        for cat, x, y, w, h in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "instances.json").write_text(json.dumps(data))
    return CocoDataset(root)


@pytest.fixture
def dataset(tmp_path: Path) -> CocoDataset:
    return _dataset(tmp_path / "coco")


def _dets(rows: list[tuple[int, float, float, float, float, float]]) -> Detections:
    """(class index, score, x1, y1, x2, y2) rows."""
    if not rows:
        return Detections.empty()
    array = np.asarray(rows, dtype=np.float64)
    return Detections(array[:, 2:], array[:, 1], array[:, 0].astype(int))


def _perfect() -> dict[int, Detections]:
    index = {1: PERSON, 3: CAR}
    return {
        image_id: _dets([(index[c], 0.9, x, y, x + w, y + h) for c, x, y, w, h in objects])
        for image_id, objects in GROUND_TRUTH.items()
    }


def test_perfect_detections_score_one(
    dataset: CocoDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = evaluate_coco(_perfect(), dataset)
    assert (metrics.map, metrics.map50, metrics.map75) == pytest.approx((1.0, 1.0, 1.0))
    assert metrics.per_class == pytest.approx({"person": 1.0, "truck": None, "car": 1.0})
    assert metrics.num_images == 3 and metrics.num_detections == 6
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_hand_computed_case(dataset: CocoDataset) -> None:
    detections = {
        10: _dets(
            [
                (PERSON, 0.9, 25, 0, 30, 5),  # false positive, ranked first
                (PERSON, 0.8, 0, 0, 10, 10),  # exact match, ranked second
                (CAR, 0.7, 20, 20, 30, 27.2),  # IoU 0.72 with the car
            ]
        )
    }
    metrics = evaluate_coco(detections, dataset)
    # person: precision 1/2 at recall 1 on every IoU threshold → AP 0.5
    # car: a perfect match at IoU thresholds 0.50..0.70 (5 of 10), none above → AP 0.5
    assert metrics.per_class["person"] == pytest.approx(0.5)
    assert metrics.per_class["car"] == pytest.approx(0.5)
    assert metrics.map == pytest.approx(0.5)
    assert metrics.map50 == pytest.approx((0.5 + 1.0) / 2)
    assert metrics.map75 == pytest.approx((0.5 + 0.0) / 2)
    # every object is under 32² pixels: small only
    assert metrics.map_small == pytest.approx(0.5)
    assert metrics.map_medium is None and metrics.map_large is None


def test_only_the_evaluated_images_count(dataset: CocoDataset) -> None:
    only_11 = {11: _perfect()[11]}
    assert evaluate_coco(only_11, dataset).map == pytest.approx(1.0)
    missing_10 = {**_perfect(), 10: Detections.empty()}
    assert evaluate_coco(missing_10, dataset).map < 0.99


def test_empty_detections_do_not_crash(dataset: CocoDataset) -> None:
    metrics = evaluate_coco({i: Detections.empty() for i in GROUND_TRUTH}, dataset)
    assert (metrics.map, metrics.map50, metrics.num_detections) == (0.0, 0.0, 0)
    assert metrics.per_class["person"] == 0.0 and metrics.per_class["truck"] is None


def test_agrees_with_a_direct_pycocotools_run(
    dataset: CocoDataset, rng: np.random.Generator
) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    index = {1: PERSON, 3: CAR}
    detections: dict[int, Detections] = {}
    for image_id, objects in GROUND_TRUTH.items():
        rows = []
        for cat, x, y, w, h in objects:
            jitter = rng.normal(0, 2.0, size=4)
            cls = index[cat] if rng.uniform() > 0.2 else 2
            rows.append(
                (
                    cls,
                    rng.uniform(0.3, 1),
                    x + jitter[0],
                    y + jitter[1],
                    x + w + jitter[2],
                    y + h + jitter[3],
                )
            )
        for _ in range(3):
            x, y = rng.uniform(0, 80, size=2)
            rows.append((int(rng.integers(0, 3)), rng.uniform(0, 0.5), x, y, x + 15, y + 12))
        detections[image_id] = _dets(rows)
    ours = evaluate_coco(detections, dataset)

    category_ids = [1, 3, 7]
    results = [
        {
            "image_id": image_id,
            "category_id": category_ids[int(c)],
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "score": float(s),
        }
        for image_id, dets in detections.items()
        for b, s, c in zip(dets.boxes, dets.scores, dets.class_ids, strict=True)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(dataset.annotation_path))
        evaluator = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert 0.0 < ours.map < 1.0
    np.testing.assert_allclose([ours.map, ours.map50, ours.map75], evaluator.stats[:3], rtol=1e-6)
    for ours_value, theirs in zip(
        [ours.map_small, ours.map_medium, ours.map_large], evaluator.stats[3:6], strict=True
    ):
        assert (ours_value is None) == (theirs < 0)
        if ours_value is not None:
            assert ours_value == pytest.approx(theirs, rel=1e-6)


def test_spec_category_ids_and_name_matching(dataset: CocoDataset) -> None:
    assert category_ids_for(ModelSpec(), dataset) == (1, 3, 7)
    assert category_ids_for(ModelSpec(category_ids=(3, 1)), dataset) == (3, 1)
    # two classes for three categories: matched by name, not by order
    assert category_ids_for(ModelSpec(class_names=("car", "truck")), dataset) == (3, 7)
    with pytest.raises(BadInputError, match="'boat'"):
        category_ids_for(ModelSpec(class_names=("boat",)), dataset)
    # index 0 is the car when the spec says so
    swapped = {11: _dets([(0, 0.9, 5, 5, 15, 15)])}
    assert evaluate_coco(swapped, dataset, category_ids=(3, 1)).map == pytest.approx(1.0)


def test_bad_inputs_are_reported(dataset: CocoDataset) -> None:
    with pytest.raises(BadInputError, match="class index 5"):
        evaluate_coco({10: _dets([(5, 0.9, 0, 0, 1, 1)])}, dataset)
    with pytest.raises(BadInputError, match="image id 99"):
        evaluate_coco({99: Detections.empty()}, dataset)


def test_no_ground_truth_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
        "annotations": [],
        "categories": CATEGORIES,
    }
    (root / "instances.json").write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="no annotations"):
        evaluate_coco({1: Detections.empty()}, CocoDataset(root))
