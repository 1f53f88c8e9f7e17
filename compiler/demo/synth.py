"""Deterministic synthetic detection data: coloured shapes on textured backgrounds, COCO JSON.

Every image is drawn from its own generator, ``numpy.random.default_rng((seed, index))``, so a
dataset of ``n`` images is the first ``n`` images of any larger one with the same seed, and the
bytes written (lossless PNG + JSON) are identical run after run on the same Pillow / zlib.

Shapes are rasterised at ``_SUPERSAMPLE`` times the resolution and box-filtered down, which gives
anti-aliased edges without any resampling filter whose output could vary between builds.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import replace_directory

#: class index i has COCO category id i + 1
CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")

#: file name of the COCO annotations inside a dataset folder
ANNOTATIONS_FILE = "instances.json"
IMAGES_DIR = "images"

_SUPERSAMPLE = 4
_MIN_OBJECTS, _MAX_OBJECTS = 1, 8
#: shape extent (circumscribed diameter) as a fraction of the image side: 16 px to 120 px at 256
_MIN_EXTENT, _MAX_EXTENT = 0.0625, 0.47
#: overlap allowed between two boxes: partial occlusion, never one shape hidden under another
_MAX_IOU, _MAX_COVER = 0.3, 0.35
#: a shape's colour must differ from the background under it by at least this (mean |ΔRGB|)
_MIN_CONTRAST = 60.0


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn shape: class index (0-based), box [x, y, w, h] in pixels, visible-mask area."""

    class_index: int
    bbox: tuple[float, float, float, float]
    area: float


def class_names() -> tuple[str, ...]:
    """The shape classes, in class-index order (category id = index + 1)."""
    return CLASS_NAMES


def category_ids() -> list[int]:
    """COCO category ids of the classes, in class-index order."""
    return [index + 1 for index in range(len(CLASS_NAMES))]


def render_image(
    rng: np.random.Generator, image_size: int = 256
) -> tuple[np.ndarray, list[SyntheticObject]]:
    """Draw one image (uint8 HxWx3 RGB) and its objects; deterministic in ``rng``'s state."""
    canvas = _background(rng, image_size)
    placed: list[tuple[float, float, float, float]] = []
    objects: list[SyntheticObject] = []
    for _ in range(int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))):
        class_index = int(rng.integers(len(CLASS_NAMES)))
        shape = _place_shape(rng, class_index, image_size, placed)
        if shape is None:
            continue
        polygons, holes, box = shape
        coverage, origin = _rasterise(polygons, holes, box, image_size)
        colour = _pick_colour(rng, canvas, coverage, origin)
        _composite(rng, canvas, coverage, origin, colour)
        placed.append(box)
        x0, y0, x1, y1 = box
        objects.append(
            SyntheticObject(
                class_index=class_index,
                bbox=(round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)),
                area=round(float(coverage.sum()), 2),
            )
        )
    noise_sigma = float(rng.uniform(0.0, 10.0))
    canvas += rng.normal(0.0, noise_sigma, size=canvas.shape).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def generate_dataset(out_dir: Path, n: int, seed: int, image_size: int = 256) -> Path:
    """Write ``n`` images to ``out_dir/images/*.png`` and their COCO ``out_dir/instances.json``.

    Built in a temporary folder beside ``out_dir`` and renamed into place, so a reader never sees
    half a dataset. An existing dataset folder at ``out_dir`` is replaced; any other non-empty
    folder there is refused. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if n < 1:
        raise BadInputError(f"synthetic dataset {out_dir}: n must be at least 1, got {n}")
    if image_size < 32:
        raise BadInputError(
            f"synthetic dataset {out_dir}: image_size must be >= 32, got {image_size}"
        )
    if out_dir.exists() and not _is_replaceable(out_dir):
        raise BadInputError(
            f"{out_dir} exists and is not a detc synthetic dataset: choose an empty or new folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (staging / IMAGES_DIR).mkdir()
        images: list[dict[str, object]] = []
        annotations: list[dict[str, object]] = []
        for index in range(n):
            pixels, objects = render_image(np.random.default_rng((seed, index)), image_size)
            file_name = f"{index:06d}.png"
            Image.fromarray(pixels).save(
                staging / IMAGES_DIR / file_name, format="PNG", compress_level=1
            )
            image_id = index + 1
            images.append(
                {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
            )
            for obj in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": obj.class_index + 1,
                        "bbox": list(obj.bbox),
                        "area": obj.area,
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {
                "description": "detc synthetic shapes",
                "seed": seed,
                "image_size": image_size,
                "num_images": n,
            },
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": index + 1, "name": name, "supercategory": "shape"}
                for index, name in enumerate(CLASS_NAMES)
            ],
        }
        (staging / ANNOTATIONS_FILE).write_text(json.dumps(coco, indent=1) + "\n")
        replace_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load_dataset(dataset_dir: Path) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Read a dataset written by :func:`generate_dataset` back into memory.

    Returns images (N, H, W, 3) uint8 in ``images`` order, and per image the boxes (K, 4) float32
    as x0, y0, x1, y1 pixels and class indices (K,) int64.
    """
    dataset_dir = Path(dataset_dir)
    annotations_path = dataset_dir / ANNOTATIONS_FILE
    if not annotations_path.is_file():
        raise BadInputError(f"{annotations_path} is missing: generate the dataset first")
    coco = json.loads(annotations_path.read_text())
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    pixels: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for image in coco["images"]:
        with Image.open(dataset_dir / IMAGES_DIR / image["file_name"]) as handle:
            pixels.append(np.asarray(handle.convert("RGB")))
        anns = by_image.get(int(image["id"]), [])
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))
        labels.append(np.array([int(a["category_id"]) - 1 for a in anns], dtype=np.int64))
    return np.stack(pixels), boxes, labels


# --- backgrounds -----------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = int(rng.integers(5))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    first, second = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    if kind == 0:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) % 1.0
        field = t
    elif kind == 1:  # radial gradient
        cx, cy = rng.uniform(0, 1, size=2)
        field = np.clip(np.hypot(xx - cx, yy - cy) / 1.2, 0, 1)
    elif kind == 2:  # soft stripes at a random angle and period
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.03, 0.25)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        field = 0.5 + 0.5 * np.sin(2 * math.pi * phase / period)
        second = first + (second - first) * np.float32(rng.uniform(0.2, 0.6))
    elif kind == 3:  # low-contrast checkerboard
        cell = rng.uniform(0.04, 0.2)
        field = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
        second = first + (second - first) * np.float32(rng.uniform(0.15, 0.4))
    else:  # smooth value noise: a coarse random grid, bilinearly upsampled
        coarse = int(rng.integers(3, 12))
        grid = rng.uniform(0, 1, size=(coarse + 1, coarse + 1)).astype(np.float32)
        field = _bilinear_upsample(grid, size)
    canvas = first + (second - first) * field[..., None].astype(np.float32)
    # fine texture on every background so flat regions are never perfectly flat
    canvas += rng.normal(0.0, rng.uniform(2.0, 12.0), size=(size, size, 1)).astype(np.float32)
    return canvas.astype(np.float32)


def _bilinear_upsample(grid: np.ndarray, size: int) -> np.ndarray:
    cells = grid.shape[0] - 1
    coords = np.linspace(0, cells, size, dtype=np.float32)
    low = np.minimum(np.floor(coords).astype(np.int64), cells - 1)
    frac = coords - low
    rows = grid[low] * (1 - frac)[:, None] + grid[low + 1] * frac[:, None]
    return rows[:, low] * (1 - frac)[None, :] + rows[:, low + 1] * frac[None, :]


# --- shapes ----------------------------------------------------------------------------------

Polygon = list[tuple[float, float]]


def _outline(
    class_index: int, radius: float, rotation: float
) -> tuple[list[Polygon], list[Polygon]]:
    """Filled polygons and hole polygons of a shape centred at the origin."""
    name = CLASS_NAMES[class_index]

    def regular(count: int, r: float, start: float = 0.0) -> Polygon:
        return [
            (r * math.cos(start + rotation + 2 * math.pi * k / count),
             r * math.sin(start + rotation + 2 * math.pi * k / count))
            for k in range(count)
        ]  # fmt: skip

    if name == "circle":
        return [regular(96, radius)], []
    if name == "ring":
        return [regular(96, radius)], [regular(96, radius * 0.55)]
    if name == "square":
        return [regular(4, radius, math.pi / 4)], []
    if name == "triangle":
        return [regular(3, radius, -math.pi / 2)], []
    if name == "star":
        outer = regular(5, radius, -math.pi / 2)
        inner = regular(5, radius * 0.42, -math.pi / 2 + math.pi / 5)
        return [[p for pair in zip(outer, inner, strict=True) for p in pair]], []
    if name == "cross":
        arm = radius * 0.32
        base = [
            (arm, -radius), (arm, -arm), (radius, -arm), (radius, arm), (arm, arm), (arm, radius),
            (-arm, radius), (-arm, arm), (-radius, arm), (-radius, -arm), (-arm, -arm),
            (-arm, -radius),
        ]  # fmt: skip
        cos_r, sin_r = math.cos(rotation), math.sin(rotation)
        return [[(x * cos_r - y * sin_r, x * sin_r + y * cos_r) for x, y in base]], []
    raise AssertionError(f"no outline for class {name}")


def _place_shape(
    rng: np.random.Generator,
    class_index: int,
    image_size: int,
    placed: list[tuple[float, float, float, float]],
) -> tuple[list[Polygon], list[Polygon], tuple[float, float, float, float]] | None:
    extent = math.exp(rng.uniform(math.log(_MIN_EXTENT), math.log(_MAX_EXTENT))) * image_size
    rotation = float(rng.uniform(0, 2 * math.pi))
    fills, holes = _outline(class_index, extent / 2, rotation)
    xs = [x for x, _ in fills[0]]
    ys = [y for _, y in fills[0]]
    left, right, top, bottom = min(xs), max(xs), min(ys), max(ys)
    for _ in range(20):
        cx = float(rng.uniform(1 - left, image_size - 1 - right))
        cy = float(rng.uniform(1 - top, image_size - 1 - bottom))
        box = (cx + left, cy + top, cx + right, cy + bottom)
        if all(_overlap_ok(box, other) for other in placed):
            shift = [[(x + cx, y + cy) for x, y in polygon] for polygon in (*fills, *holes)]
            return shift[: len(fills)], shift[len(fills) :], box
    return None


def _overlap_ok(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return True
    inter = inter_w * inter_h
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    iou = inter / (area_a + area_b - inter)
    return iou <= _MAX_IOU and inter / min(area_a, area_b) <= _MAX_COVER


def _rasterise(
    fills: list[Polygon],
    holes: list[Polygon],
    box: tuple[float, float, float, float],
    image_size: int,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Coverage in [0, 1] of the shape over the pixels of its box, and the box's pixel origin."""
    x0, y0 = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
    x1 = min(math.ceil(box[2]), image_size)
    y1 = min(math.ceil(box[3]), image_size)
    scale = _SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * scale, (y1 - y0) * scale), 0)
    draw = ImageDraw.Draw(mask)
    for polygons, value in ((fills, 255), (holes, 0)):
        for polygon in polygons:
            # pixel centres sit at +0.5: map continuous coordinates onto the supersampled grid
            draw.polygon([((x - x0) * scale - 0.5, (y - y0) * scale - 0.5) for x, y in polygon],
                         fill=value)  # fmt: skip
    coverage = np.asarray(mask.reduce(scale), dtype=np.float32) / 255.0
    return coverage, (x0, y0)


def _pick_colour(
    rng: np.random.Generator, canvas: np.ndarray, coverage: np.ndarray, origin: tuple[int, int]
) -> np.ndarray:
    x0, y0 = origin
    region = canvas[y0 : y0 + coverage.shape[0], x0 : x0 + coverage.shape[1]]
    weights = coverage[..., None]
    under = (region * weights).sum(axis=(0, 1)) / max(float(coverage.sum()), 1e-6)
    best, best_contrast = np.zeros(3, dtype=np.float32), -1.0
    for _ in range(12):
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        contrast = float(np.abs(colour - under).mean())
        if contrast >= _MIN_CONTRAST:
            return colour
        if contrast > best_contrast:
            best, best_contrast = colour, contrast
    return best


def _composite(
    rng: np.random.Generator,
    canvas: np.ndarray,
    coverage: np.ndarray,
    origin: tuple[int, int],
    colour: np.ndarray,
) -> None:
    x0, y0 = origin
    height, width = coverage.shape
    # gentle shading across the shape so fills are not perfectly flat
    shade = rng.uniform(-25.0, 25.0, size=2).astype(np.float32)
    ramp_y = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    ramp_x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    fill = colour[None, None, :] + (shade[0] * ramp_x + shade[1] * ramp_y)[..., None]
    region = canvas[y0 : y0 + height, x0 : x0 + width]
    alpha = coverage[..., None]
    region[...] = region * (1 - alpha) + fill * alpha


def _is_replaceable(path: Path) -> bool:
    if not path.is_dir():
        return False
    return (path / ANNOTATIONS_FILE).is_file() or not any(path.iterdir())
