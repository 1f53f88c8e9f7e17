"""Datasets as users keep them: detc's folder, COCO's release layout, Ultralytics' data.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detc.compiler import BadInputError
from detc.compiler.detection.datasets import CocoDataset

SIZES = [(40, 60), (32, 32), (50, 20)]  # (height, width)
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
BOXES = {
    0: [(3, [5.0, 6.0, 20.0, 10.0]), (7, [30.0, 2.0, 12.0, 30.0])],
    1: [(7, [0.0, 0.0, 16.0, 16.0])],
}


def _write_images(folder: Path, rng: np.random.Generator) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for index, (height, width) in enumerate(SIZES):
        name = f"img{index}.jpg"
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def _coco(names: list[str]) -> dict:
    images = [
        {"id": i, "file_name": n, "height": h, "width": w}
        for i, (n, (h, w)) in enumerate(zip(names, SIZES, strict=True))
    ]
    annotations = [
        {"id": k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, c, b) in enumerate((i, c, b) for i, boxes in BOXES.items() for c, b in boxes)
    ]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _boxes_by_name(dataset: CocoDataset) -> dict[tuple[str, str], list[list[float]]]:
    names = {c["id"]: c["name"] for c in dataset.categories}
    files = {img["id"]: Path(img["file_name"]).name for img in dataset.images}
    found: dict[tuple[str, str], list[list[float]]] = {}
    for ann in dataset.data["annotations"]:
        key = (files[ann["image_id"]], names[ann["category_id"]])
        found.setdefault(key, []).append([round(v, 3) for v in ann["bbox"]])
    return found


@pytest.fixture
def detc_layout(tmp_path: Path, rng: np.random.Generator) -> Path:
    root = tmp_path / "detc"
    names = _write_images(root / "images", rng)
    (root / "instances.json").write_text(json.dumps(_coco(names)))
    return root


def test_cocos_release_layout_reads_like_detcs(tmp_path: Path, rng, detc_layout: Path):
    root = tmp_path / "coco"
    names = _write_images(root / "val2017", rng)
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(_coco(names)))
    dataset = CocoDataset(root)
    assert dataset.layout == "coco" and len(dataset) == 3
    assert _boxes_by_name(dataset) == _boxes_by_name(CocoDataset(detc_layout))


def test_an_ultralytics_data_yaml_with_yolo_labels_reads_like_detcs(
    tmp_path: Path, rng, detc_layout: Path
):
    root = tmp_path / "yolo"
    names = _write_images(root / "images" / "val", rng)
    (root / "labels" / "val").mkdir(parents=True)
    class_index = {3: 0, 7: 1}
    for image_index, boxes in BOXES.items():
        height, width = SIZES[image_index]
        lines = [
            f"{class_index[c]} {(x + w / 2) / width} {(y + h / 2) / height} "
            f"{w / width} {h / height}"
            for c, (x, y, w, h) in boxes
        ]
        stem = Path(names[image_index]).stem
        (root / "labels" / "val" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\nval: images/val\nnames:\n  0: car\n  1: train\n")
    for given in (root, root / "data.yaml"):
        dataset = CocoDataset(given)
        assert dataset.layout == "yolo" and len(dataset) == 3
        assert dataset.category_names == ("car", "train")
        assert _boxes_by_name(dataset) == _boxes_by_name(CocoDataset(detc_layout))


def test_an_unknown_layout_says_which_ones_are_known(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match=r"data\.yaml"):
        CocoDataset(tmp_path / "empty")


def test_a_bad_label_line_names_the_file_and_line(tmp_path: Path, rng):
    root = tmp_path / "yolo"
    _write_images(root / "images", rng)
    (root / "labels").mkdir()
    (root / "labels" / "img0.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.1 0.1 0.1 0.1\n")
    (root / "data.yaml").write_text("val: images\nnames: [car, train]\n")
    with pytest.raises(BadInputError, match=r"img0\.txt:2: class 5"):
        CocoDataset(root)
