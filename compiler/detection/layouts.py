"""The folder layouts detection datasets come in, read into one COCO-format dictionary.

* **detc's own**: ``DIR/instances.json`` + ``DIR/images/``.
* **COCO's release layout**: ``DIR/annotations/instances_<split>.json`` + ``DIR/<split>/``
  (``val2017``, ``train2017``, ...; with several splits, the validation one).
* **Ultralytics YOLO**: a ``data.yaml`` (the file, or ``DIR/data.yaml``) whose ``val`` names image
  folders (or a list file) and ``names`` the classes, with one ``labels/…/<image>.txt`` per image
  of ``class cx cy w h`` lines normalised to 0..1. Category ids are the class indices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from detc.compiler.errors import BadInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_LAYOUTS_HELP = (
    "expected DIR/images/ + DIR/instances.json, COCO's DIR/annotations/instances_<split>.json + "
    "DIR/<split>/, or an Ultralytics data.yaml"
)


@dataclass
class DatasetLayout:
    """Where a dataset's images are, its annotations as COCO, and what it was read from."""

    image_dir: Path  # file names in ``annotations["images"]`` are relative to it
    annotations: dict[str, Any] | None  # None: read from ``annotation_path``
    annotation_path: Path
    kind: str  # "detc", "coco" or "yolo"


def locate_dataset(root: Path) -> DatasetLayout:
    """Find which layout ``root`` (a folder or a data.yaml) is in; a one-line error otherwise."""
    if root.is_file() and root.suffix.lower() in (".yaml", ".yml"):
        return _yolo_layout(root)
    if not root.is_dir():
        raise BadInputError(f"dataset {root} is not a folder or a data.yaml ({_LAYOUTS_HELP})")
    if (root / "instances.json").is_file():
        if not (root / "images").is_dir():
            raise BadInputError(f"dataset {root} has no images/ folder")
        return DatasetLayout(root / "images", None, root / "instances.json", "detc")
    coco = _coco_release_layout(root)
    if coco is not None:
        return coco
    for name in ("data.yaml", "data.yml"):
        if (root / name).is_file():
            return _yolo_layout(root / name)
    raise BadInputError(f"dataset {root} has no instances.json: {_LAYOUTS_HELP}")


def _coco_release_layout(root: Path) -> DatasetLayout | None:
    folder = root / "annotations"
    if not folder.is_dir():
        return None
    candidates = []
    for path in sorted(folder.glob("instances_*.json")):
        split = path.stem.removeprefix("instances_")
        if (root / split).is_dir():
            candidates.append((split, path))
    if not candidates:
        return None
    validation = [c for c in candidates if c[0].startswith("val")]
    if len(candidates) > 1 and len(validation) != 1:
        splits = ", ".join(split for split, _ in candidates)
        raise BadInputError(
            f"dataset {root}: several annotated splits ({splits}); pass the folder of one, or "
            "keep one instances_<split>.json"
        )
    split, path = (validation or candidates)[0]
    return DatasetLayout(root / split, None, path, "coco")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"dataset {path} cannot be read ({err})") from None
    except yaml.YAMLError as err:
        raise BadInputError(
            f"dataset {path} is not valid YAML ({str(err).splitlines()[0]})"
        ) from None
    if not isinstance(data, dict):
        raise BadInputError(f"dataset {path}: expected a mapping with 'val' and 'names'")
    return data


def _class_names(path: Path, names: Any) -> list[str]:
    if isinstance(names, dict):
        try:
            indexed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise BadInputError(f"dataset {path}: 'names' keys must be class indices") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise BadInputError(f"dataset {path}: 'names' keys must be 0..n-1")
        return [indexed[i] for i in range(len(indexed))]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise BadInputError(f"dataset {path}: 'names' must list the class names")


def _yolo_images(path: Path, base: Path, val: Any) -> list[Path]:
    entries = val if isinstance(val, list) else [val]
    images: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise BadInputError(f"dataset {path}: 'val' must name image folders or a list file")
        where = (base / entry).resolve()
        if where.is_dir():
            images += sorted(
                p for p in where.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif where.is_file():  # a list file: one image path per line, relative to the base
            for line in where.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    images.append((base / line.strip()).resolve())
        else:
            raise BadInputError(f"dataset {path}: 'val' names {where}, which does not exist")
    if not images:
        raise BadInputError(f"dataset {path}: 'val' holds no images")
    return images


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, .txt."""
    parts = list(image.parts)
    if "images" not in parts:
        return image.with_suffix(".txt")
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def _yolo_layout(path: Path) -> DatasetLayout:
    data = _read_yaml(path)
    base = path.parent / str(data.get("path") or ".")
    if "val" not in data:
        raise BadInputError(f"dataset {path}: no 'val' split to evaluate on")
    names = _class_names(path, data.get("names"))
    images = _yolo_images(path, base, data["val"])
    root = Path(*_common_parts(images))
    coco: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
    }
    for image_id, image in enumerate(images):
        if not image.is_file():
            raise BadInputError(f"dataset {path}: image {image} is missing")
        with Image.open(image) as opened:
            width, height = opened.size
        coco["images"].append(
            {
                "id": image_id,
                "file_name": str(image.relative_to(root)),
                "width": width,
                "height": height,
            }
        )
        coco["annotations"] += _yolo_boxes(_label_path(image), image_id, width, height, len(names))
    for index, annotation in enumerate(coco["annotations"]):
        annotation["id"] = index + 1
    return DatasetLayout(root, coco, path, "yolo")


def _common_parts(paths: list[Path]) -> tuple[str, ...]:
    first = paths[0].parent.parts
    length = len(first)
    for path in paths[1:]:
        parts = path.parent.parts
        length = next((i for i in range(min(length, len(parts))) if parts[i] != first[i]), length)
        length = min(length, len(parts))
    return first[:length]


def _yolo_boxes(
    label: Path, image_id: int, width: int, height: int, num_classes: int
) -> list[dict[str, Any]]:
    if not label.is_file():
        return []  # Ultralytics reads a missing label file as an image without objects
    boxes = []
    for number, line in enumerate(label.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:5])
        except (ValueError, IndexError):
            raise BadInputError(
                f"labels {label}:{number}: expected 'class cx cy w h' (normalised)"
            ) from None
        if not 0 <= cls < num_classes:
            raise BadInputError(f"labels {label}:{number}: class {cls} is not in 'names'")
        boxes.append(
            {
                "image_id": image_id,
                "category_id": cls,
                "bbox": [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height],
                "area": w * width * h * height,
                "iscrowd": 0,
            }
        )
    return boxes


def read_annotations(layout: DatasetLayout) -> dict[str, Any]:
    """The layout's COCO dictionary (parsed from its JSON file unless built in memory)."""
    if layout.annotations is not None:
        return layout.annotations
    path = layout.annotation_path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"annotations {path} are not valid JSON ({err})") from None
    except OSError as err:
        raise BadInputError(f"annotations {path} cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"annotations {path}: expected a COCO object at the top level")
    return data
