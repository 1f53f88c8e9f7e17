"""Images in, model-ready tensors out: preprocessing, COCO datasets and plain image folders.

Images are read with Pillow and converted to RGB. EXIF orientation is deliberately NOT applied:
COCO annotations refer to the pixels as stored, and so must the boxes detc maps back.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from detc.compiler.detection.layouts import IMAGE_SUFFIXES, locate_dataset, read_annotations
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError


@dataclass(frozen=True)
class LetterboxTransform:
    """How original-image pixels map to model-input pixels: ``input = original * gain + pad``.

    ``gain`` is the real ratio of resized to original size per axis (the resized image has an
    integer size, so the two axes can differ slightly even in letterbox mode).
    """

    original_size: tuple[int, int]  # (height, width) of the image as stored
    input_size: tuple[int, int]  # (height, width) of the model input
    gain: tuple[float, float]  # (y, x)
    pad: tuple[int, int]  # (top, left) border in model-input pixels

    def boxes_to_original(self, xyxy: np.ndarray) -> np.ndarray:
        """Map (N, 4) x1,y1,x2,y2 boxes from model-input pixels to original pixels, clipped."""
        boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        gain_y, gain_x = self.gain
        top, left = self.pad
        out = np.empty_like(boxes)
        out[:, [0, 2]] = (boxes[:, [0, 2]] - left) / gain_x
        out[:, [1, 3]] = (boxes[:, [1, 3]] - top) / gain_y
        height, width = self.original_size
        out[:, [0, 2]] = out[:, [0, 2]].clip(0.0, width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0.0, height)
        return out.astype(np.float32)

    def boxes_to_input(self, xyxy: np.ndarray) -> np.ndarray:
        """Map (N, 4) boxes from original pixels to model-input pixels (the inverse; unclipped)."""
        boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
        gain_y, gain_x = self.gain
        top, left = self.pad
        out = np.empty_like(boxes)
        out[:, [0, 2]] = boxes[:, [0, 2]] * gain_x + left
        out[:, [1, 3]] = boxes[:, [1, 3]] * gain_y + top
        return out.astype(np.float32)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB (no EXIF rotation); a missing or undecodable file is a BadInputError."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the decode inside the try
    except FileNotFoundError:
        raise BadInputError(f"image {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadInputError(
            f"image {path} cannot be decoded ({err}); replace or remove it"
        ) from None


def letterbox_geometry(
    original_size: tuple[int, int], input_size: tuple[int, int], spec: ModelSpec
) -> LetterboxTransform:
    """Size of the resized image and its padding, as YOLOv5's letterbox computes them."""
    height, width = original_size
    input_h, input_w = input_size
    if spec.resize == "resize":
        return LetterboxTransform(
            original_size, input_size, (input_h / height, input_w / width), (0, 0)
        )
    ratio = min(input_h / height, input_w / width)
    new_w, new_h = round(width * ratio), round(height * ratio)
    if spec.pad_align == "top-left":
        top = left = 0
    else:
        # YOLOv5 splits an odd border with round(d - 0.1) on the top/left side.
        top = round((input_h - new_h) / 2 - 0.1)
        left = round((input_w - new_w) / 2 - 0.1)
    return LetterboxTransform(
        original_size, input_size, (new_h / height, new_w / width), (top, left)
    )


def preprocess(image: Image.Image, spec: ModelSpec) -> tuple[np.ndarray, LetterboxTransform]:
    """Turn a PIL image into a batch-of-1 input tensor for ``spec`` and the box transform back."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    width, height = image.size
    transform = letterbox_geometry((height, width), spec.input_size, spec)
    input_h, input_w = spec.input_size
    new_h = round(height * transform.gain[0])
    new_w = round(width * transform.gain[1])
    resized = (
        image
        if (new_w, new_h) == (width, height)
        else image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    )
    pixels = np.asarray(resized, dtype=np.float32)
    if (new_h, new_w) != (input_h, input_w):
        canvas = np.full((input_h, input_w, 3), spec.pad_value, dtype=np.float32)
        top, left = transform.pad
        canvas[top : top + new_h, left : left + new_w] = pixels
        pixels = canvas
    if spec.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    pixels = (pixels * np.float32(spec.scale) - mean) / std
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    tensor = np.ascontiguousarray(pixels[np.newaxis], dtype=spec.dtype)
    return tensor, transform


class Sample(NamedTuple):
    """One preprocessed image; unpacks as (image_id, path, original_size, tensor, transform)."""

    image_id: int
    path: Path
    original_size: tuple[int, int]  # (height, width)
    tensor: np.ndarray  # batch of 1, in the spec's layout and dtype
    transform: LetterboxTransform


def _samples(
    entries: list[tuple[int, Path]], spec: ModelSpec, max_images: int | None
) -> Iterator[Sample]:
    chosen = entries if max_images is None else entries[:max_images]
    for image_id, path in chosen:
        image = load_image(path)
        tensor, transform = preprocess(image, spec)
        yield Sample(image_id, path, transform.original_size, tensor, transform)


class CocoDataset:
    """A labelled detection set in any layout :func:`locate_dataset` knows, as COCO.

    ``root/images/*`` + ``root/instances.json``, COCO's ``annotations/instances_<split>.json`` +
    ``<split>/``, or an Ultralytics ``data.yaml`` with YOLO txt labels. Iterate with
    ``dataset.samples(spec)`` (or ``iter(dataset)`` when built with a spec).
    """

    def __init__(self, root: str | Path, spec: ModelSpec | None = None) -> None:
        self.root = Path(root)
        self.spec = spec
        layout = locate_dataset(self.root)
        self.layout = layout.kind
        self.annotation_path = layout.annotation_path
        self.image_dir = layout.image_dir
        self._coco: Any = None
        self.data = self._check_annotations(read_annotations(layout))
        self.categories: list[dict[str, Any]] = sorted(
            self.data["categories"], key=lambda c: c["id"]
        )
        self.images: list[dict[str, Any]] = list(self.data["images"])
        self._entries = [(int(img["id"]), self.image_dir / img["file_name"]) for img in self.images]
        missing = [path for _, path in self._entries if not path.is_file()]
        if missing:
            raise BadInputError(
                f"dataset {self.root}: {len(missing)} image(s) listed in "
                f"{self.annotation_path.name} are missing, first {missing[0]}"
            )

    def _check_annotations(self, data: dict[str, Any]) -> dict[str, Any]:
        path = self.annotation_path
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise BadInputError(f"annotations {path}: no '{key}' list (not COCO format)")
        try:
            for image in data["images"]:
                int(image["id"]), str(image["file_name"])
            for category in data["categories"]:
                int(category["id"]), str(category["name"])
            for ann in data["annotations"]:
                int(ann["image_id"]), int(ann["category_id"])
                if len(ann["bbox"]) != 4:
                    raise ValueError("bbox must have 4 numbers")
        except (KeyError, TypeError, ValueError) as err:
            raise BadInputError(f"annotations {path}: malformed entry ({err!r})") from None
        return data

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def image_ids(self) -> list[int]:
        return [image_id for image_id, _ in self._entries]

    @property
    def category_ids(self) -> tuple[int, ...]:
        """Category ids ordered by id: the default class-index → category-id mapping."""
        return tuple(int(c["id"]) for c in self.categories)

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(str(c["name"]) for c in self.categories)

    def coco(self) -> Any:
        """A pycocotools ``COCO`` of the ground truth (built once; its prints silenced)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO()
                coco.dataset = self.data
                coco.createIndex()
            self._coco = coco
        return self._coco

    def samples(
        self, spec: ModelSpec | None = None, max_images: int | None = None
    ) -> Iterator[Sample]:
        """Load and preprocess images in instances.json order (the first ``max_images``)."""
        return _samples(self._entries, _need_spec(spec or self.spec, self.root), max_images)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()


class ImageFolder:
    """Unlabelled images (e.g. for calibration): ``root/*.jpg`` etc., or ``root/images/*``.

    Image ids are positions in file-name order.
    """

    def __init__(self, root: str | Path, spec: ModelSpec | None = None) -> None:
        self.root = Path(root)
        self.spec = spec
        if not self.root.is_dir():
            raise BadInputError(f"image folder {self.root} is not a folder")
        paths = _image_files(self.root)
        if not paths and (self.root / "images").is_dir():
            paths = _image_files(self.root / "images")
        if not paths:
            raise BadInputError(
                f"image folder {self.root} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        self.paths = paths
        self._entries = list(enumerate(paths))

    def __len__(self) -> int:
        return len(self._entries)

    def samples(
        self, spec: ModelSpec | None = None, max_images: int | None = None
    ) -> Iterator[Sample]:
        return _samples(self._entries, _need_spec(spec or self.spec, self.root), max_images)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _need_spec(spec: ModelSpec | None, root: Path) -> ModelSpec:
    if spec is None:
        raise BadInputError(f"dataset {root}: a model spec is needed to preprocess its images")
    return spec
