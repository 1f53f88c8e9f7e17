"""The images recovery learns from: read once, split, and turned into augmented training crops.

Images are letterboxed to the model's input size as the deployed model will see them and kept as
uint8 (1,000 images at 640 px: 1.2 GB as uint8, 4.9 GB as float32). A fixed slice, drawn with
the seed, is held out: the loss on it decides whether a step is kept and when training stops.

Training crops keep the objects' native scale (a random rescale around 1, then a crop of the
training side), with 2 x 2 mosaics, horizontal flips and colour jitter: label-free augmentation,
as the teacher labels every view itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError
from detc.compiler.progress import progress
from detc.passes.distill import place_at_random


@dataclass
class ImageSet:
    """uint8 (1, C, H, W) letterboxed images, split into training and held-out."""

    train: list[Any]
    held_out: list[Any]
    pad_value: float  # the letterbox colour, as the model reads it (0..1 for YOLO)
    scale: float  # model input = uint8 pixel * scale (mean 0, std 1 preprocessing)


def load_images(
    folder: Path, spec: Any, *, max_images: int, held_out: int, seed: int, torch: Any
) -> ImageSet:
    """Up to ``max_images`` images of ``folder`` (drawn with ``seed``); ``held_out`` set aside."""
    from detc.compiler.detection.datasets import ImageFolder, load_image, preprocess

    if not folder.is_dir():
        raise BadInputError(f"recover: images={folder} is not a folder of images")
    if any(m != 0.0 for m in spec.mean) or any(s != 1.0 for s in spec.std):
        raise BadInputError(
            f"recover: the model spec normalises with mean {spec.mean} / std {spec.std}; "
            "recovery supports scale-only preprocessing (YOLO-style) for now"
        )
    paths = ImageFolder(folder).paths
    if len(paths) <= held_out:
        raise BadInputError(
            f"recover: {folder} holds {len(paths)} images; held_out={held_out} leaves none to "
            "train on (give more images or a smaller held_out)"
        )
    rng = np.random.default_rng(seed)
    count = min(max_images, len(paths))
    chosen = rng.permutation(len(paths))[:count].tolist()
    images = []
    for index in progress(chosen, "recover: reading images", "image"):
        tensor, _ = preprocess(load_image(paths[index]), spec)
        pixels = np.clip(np.rint(tensor / spec.scale), 0, 255).astype(np.uint8)
        images.append(torch.from_numpy(pixels))
    return ImageSet(
        train=images[held_out:],
        held_out=images[:held_out],
        pad_value=float(spec.pad_value) * float(spec.scale),
        scale=float(spec.scale),
    )


class AugmentedCrops:
    """Random training inputs of ``size`` x ``size`` made from uint8 images."""

    def __init__(
        self, images: ImageSet, seed: int, torch: Any, *, mosaic: float = 0.5, jitter: float = 0.4
    ) -> None:
        self.torch = torch
        self.images = images
        self.rng = np.random.default_rng(seed)
        self.mosaic = mosaic
        self.scales = (1.0 - jitter, 1.0 + jitter)

    def _tile(self, image: Any, height: int, width: int, scale_range: tuple[float, float]) -> Any:
        """A ``height`` x ``width`` crop of ``image`` rescaled by a random factor."""
        functional = self.torch.nn.functional
        image = image.float() * self.images.scale
        scale = float(self.rng.uniform(*scale_range))
        rows, cols = image.shape[-2:]
        new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
        if (new_rows, new_cols) != (rows, cols):
            image = functional.interpolate(
                image, size=(new_rows, new_cols), mode="bilinear", align_corners=False
            )
        return place_at_random(image, height, width, self.images.pad_value, self.rng)

    def _pick(self) -> Any:
        return self.images.train[int(self.rng.integers(len(self.images.train)))]

    def view(self, size: int, *, augment: bool = True) -> Any:
        """One input; without ``augment`` a plain crop at native scale (cached inputs)."""
        if not augment:
            return self._tile(self._pick(), size, size, (1.0, 1.0))
        scales = self.scales
        if self.rng.random() < self.mosaic:
            row = int(self.rng.integers(size // 4, 3 * size // 4 + 1))
            col = int(self.rng.integers(size // 4, 3 * size // 4 + 1))
            cat = self.torch.cat
            top = cat(
                [
                    self._tile(self._pick(), row, col, scales),
                    self._tile(self._pick(), row, size - col, scales),
                ],
                dim=3,
            )
            bottom = cat(
                [
                    self._tile(self._pick(), size - row, col, scales),
                    self._tile(self._pick(), size - row, size - col, scales),
                ],
                dim=3,
            )
            out = cat([top, bottom], dim=2)
        else:
            out = self._tile(self._pick(), size, size, scales)
        if self.rng.random() < 0.5:
            out = out.flip(3)
        gains = self.rng.uniform(0.9, 1.1, size=out.shape[1]) * self.rng.uniform(0.75, 1.25)
        contrast = float(self.rng.uniform(0.8, 1.2))
        mean = out.mean()
        out = (out - mean) * contrast + mean
        out = out * self.torch.tensor(gains, dtype=out.dtype).reshape(1, -1, 1, 1)
        return out.clamp(0.0, 255.0 * self.images.scale)

    def batch(self, count: int, size: int, *, augment: bool = True) -> Any:
        return self.torch.cat([self.view(size, augment=augment) for _ in range(count)], dim=0)


def as_input(images: Sequence[Any], scale: float, torch: Any) -> Any:
    """uint8 images as one float model input batch."""
    return torch.cat([image.float() * scale for image in images], dim=0)
