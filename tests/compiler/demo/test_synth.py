"""Synthetic detection data: byte-for-byte determinism, COCO sanity, atomic replacement."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detc.compiler.demo import synth
from detc.compiler.errors import BadInputError

SIZE = 96  # small images keep the tests fast; shapes scale with the image


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _coco(folder: Path) -> dict:
    return json.loads((folder / synth.ANNOTATIONS_FILE).read_text())


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = synth.generate_dataset(tmp_path / "a", 6, seed=7, image_size=SIZE)
    second = synth.generate_dataset(tmp_path / "b", 6, seed=7, image_size=SIZE)
    digests = _digests(first)
    assert len(digests) == 6 + 1  # six PNGs and the annotations
    assert digests == _digests(second)


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    first = _digests(synth.generate_dataset(tmp_path / "a", 3, seed=1, image_size=SIZE))
    second = _digests(synth.generate_dataset(tmp_path / "b", 3, seed=2, image_size=SIZE))
    assert all(first[name] != second[name] for name in first)


def test_smaller_set_is_a_prefix_of_a_larger_one(tmp_path: Path) -> None:
    small = _digests(synth.generate_dataset(tmp_path / "small", 2, seed=3, image_size=SIZE))
    large = _digests(synth.generate_dataset(tmp_path / "large", 4, seed=3, image_size=SIZE))
    for name, digest in small.items():
        if name.startswith("images/"):
            assert large[name] == digest


def test_annotations_are_sane_coco(tmp_path: Path) -> None:
    n = 12
    folder = synth.generate_dataset(tmp_path / "data", n, seed=11, image_size=SIZE)
    coco = _coco(folder)
    assert [c["id"] for c in coco["categories"]] == synth.category_ids()
    assert tuple(c["name"] for c in coco["categories"]) == synth.class_names()
    assert 5 <= len(synth.class_names()) <= 8
    assert len(coco["images"]) == n
    image_ids = {image["id"] for image in coco["images"]}
    for image in coco["images"]:
        with Image.open(folder / synth.IMAGES_DIR / image["file_name"]) as handle:
            assert handle.format == "PNG"
            assert handle.mode == "RGB"
            assert handle.size == (image["width"], image["height"]) == (SIZE, SIZE)
    annotations = coco["annotations"]
    assert len({a["id"] for a in annotations}) == len(annotations)
    per_image = {image_id: 0 for image_id in image_ids}
    for ann in annotations:
        assert ann["image_id"] in image_ids
        assert ann["category_id"] in synth.category_ids()
        assert ann["iscrowd"] == 0
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
        # the area is the drawn shape's coverage: inside its box, and not a sliver of it
        assert 0.2 * w * h < ann["area"] <= w * h * 1.02
        per_image[ann["image_id"]] += 1
    assert max(per_image.values()) <= 8
    # placement can fail on a crowded image, but almost every image has something to find
    assert sum(count >= 1 for count in per_image.values()) >= 0.9 * n


def test_boxes_fit_the_drawn_shapes(tmp_path: Path) -> None:
    """A circle fills π/4 of its box and a square at least half: the box is tight, not padded.

    Shapes under 12 px are left out: there the rasteriser's edge pixels (an eighth of a pixel
    of outline) weigh too much for a tight figure.
    """
    folder = synth.generate_dataset(tmp_path / "data", 20, seed=5, image_size=128)
    fills: dict[str, list[float]] = {"circle": [], "square": []}
    names = dict(zip(synth.category_ids(), synth.class_names(), strict=True))
    for ann in _coco(folder)["annotations"]:
        name = names[ann["category_id"]]
        _, _, w, h = ann["bbox"]
        if name in fills and min(w, h) >= 12:
            fills[name].append(ann["area"] / (w * h))
    assert fills["circle"] and fills["square"]
    assert np.allclose(fills["circle"], math.pi / 4, atol=0.03)
    assert min(fills["square"]) >= 0.48


def test_existing_dataset_is_replaced_other_folders_refused(tmp_path: Path) -> None:
    target = tmp_path / "data"
    synth.generate_dataset(target, 3, seed=0, image_size=SIZE)
    synth.generate_dataset(target, 2, seed=0, image_size=SIZE)
    assert len(list((target / synth.IMAGES_DIR).iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporaries left behind

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="not a detc synthetic dataset"):
        synth.generate_dataset(precious, 2, seed=0, image_size=SIZE)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="n must be"):
        synth.generate_dataset(tmp_path / "x", 0, seed=0)
    with pytest.raises(BadInputError, match="image_size"):
        synth.generate_dataset(tmp_path / "x", 1, seed=0, image_size=8)


def test_load_dataset_round_trips_boxes(tmp_path: Path) -> None:
    folder = synth.generate_dataset(tmp_path / "data", 4, seed=9, image_size=SIZE)
    images, boxes, labels = synth.load_dataset(folder)
    coco = _coco(folder)
    assert images.shape == (4, SIZE, SIZE, 3)
    assert sum(len(b) for b in boxes) == len(coco["annotations"])
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    x, y, w, h = first[0]["bbox"]
    assert np.allclose(boxes[0][0], [x, y, x + w, y + h], atol=1e-4)
    assert labels[0][0] == first[0]["category_id"] - 1
