"""Options of ``recover``: what a user asks the recovery to do, checked before any work."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the recovery steps, in the order they run when asked for
STEPS = ("stats", "blocks", "e2e")
LR_SCALINGS = ("rms", "none")


def _option(default: Any, help: str) -> Any:
    """A dataclass field whose ``metadata["help"]`` documents it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RecoverOptions:
    """Options of ``recover`` (pipeline text: ``recover{images=DIR,minutes=20}``)."""

    images: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "folder of unlabeled images from where the detector will run (required)"
    )
    teacher: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None,
        "the original model (ONNX) to distil from; default: the model as it entered the first "
        "approximate pass before recover in the same pipeline",
    )
    minutes: float = _option(20.0, "wall-clock budget of the whole recovery, in minutes")
    steps: int | None = _option(
        None,
        "end-to-end training steps; set: exactly this many (reproducible for a seed, the "
        "budget is then only a cap); unset: as many as the budget allows",
    )
    recipe: str = _option(
        "stats+blocks+e2e",
        "which steps run, in this order (+ between them): stats (per-channel scale and bias "
        "re-estimated), blocks (block-wise reconstruction on cached teacher outputs), e2e "
        "(end-to-end distillation); each is kept only if it lowers the held-out loss",
    )
    max_images: int = _option(1000, "at most this many images of `images` are read")
    held_out: int = _option(
        64,
        "images set aside (never trained on) to judge each step (agreement with the teacher's "
        "detections is noisy on few images: on 32, yolov5n's fell 7.5 points where mAP on "
        "COCO fell 0.4)",
    )
    sizes: str = _option(
        "320+640",
        "side of the square training crops of e2e, smallest first, each for an equal share of "
        "its time (crops keep the objects' native scale; multiples of the largest stride)",
    )
    batch: int = _option(4, "training inputs per e2e step")
    mosaic: float = _option(
        0.5, "share of e2e inputs made of four images (YOLO's mosaic), the rest one image each"
    )
    jitter: float = _option(
        0.4, "e2e images are rescaled by a random factor in 1 +- jitter before cropping"
    )
    lr: float = _option(
        3e-4,
        "Adam learning rate: with lr_scaling=rms, relative to each tensor's RMS (BN-folded "
        "weights differ ~75x in magnitude between tensors); cosine-decayed over the budget "
        "(yolov5n pruned: 1e-3 lost 1.4-3.1 mAP in the first minutes before climbing, 3e-4 "
        "0-0.4)",
    )
    lr_scaling: str = _option("rms", "rms: each tensor's step scales with its RMS; none: one lr")
    features: float = _option(
        1.0, "weight of the feature loss (Conv outputs shared with the teacher) beside the heads'"
    )
    labels: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None,
        "optional COCO-format dataset (the layout --data reads) whose YOLOv5 detection loss joins "
        "the distillation in e2e (decoder yolov5); never the images you measure on",
    )
    label_weight: float = _option(
        50.0,
        "weight of the labeled detection loss beside the teacher's (measured on yolov5n pruned "
        "-20 %: at weight 1 its gradient is 50-250x smaller than the distillation's)",
    )
    label_batch: int = _option(2, "annotated images per e2e step (with labels=)")
    block_images: int = _option(32, "training images whose crops block-wise reconstruction caches")
    block_steps: int = _option(100, "Adam steps per block of block-wise reconstruction")
    block_size: int = _option(320, "side of the crops of statistics and block-wise steps")
    checkpoints: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None,
        "folder: the model after each step and at each held-out check of e2e is written there "
        "(to draw the mAP curve, or to continue a longer run with teacher=ORIGINAL)",
    )
    spec: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "preprocessing of the images (model spec JSON/TOML); default: inferred"
    )
    seed: int = _option(0, "seed of every random draw (images, crops, augmentation)")
    threads: int = _option(
        1,
        "torch CPU threads; more pay only on an otherwise idle machine (measured on 2 shared "
        "cores: 2 threads ran e2e ~15x slower than 1, the threads spin-waiting on each other)",
    )

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"minutes={self.minutes} must be > 0")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1 (or unset)")
        unknown = [s for s in self.recipe_steps if s not in STEPS]
        if unknown or not self.recipe_steps:
            raise ValueError(f"recipe={self.recipe!r}: steps are {', '.join(STEPS)}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling={self.lr_scaling!r} must be one of {LR_SCALINGS}")
        for name in (
            "max_images",
            "held_out",
            "batch",
            "label_batch",
            "block_images",
            "block_steps",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.mosaic <= 1:
            raise ValueError(f"mosaic={self.mosaic} must be in [0, 1]")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter={self.jitter} must be in [0, 1)")
        if self.features < 0:
            raise ValueError(f"features={self.features} must be >= 0")
        if self.label_weight < 0:
            raise ValueError(f"label_weight={self.label_weight} must be >= 0")
        if self.held_out >= self.max_images:
            raise ValueError(
                f"held_out={self.held_out} leaves no training image of {self.max_images}"
            )
        try:
            sizes = self.crop_sizes
        except ValueError:
            raise ValueError(f"sizes={self.sizes!r}: give sides like 320,640") from None
        if not sizes or any(s < 32 or s % 32 for s in sizes) or self.block_size % 32:
            raise ValueError(f"sizes={self.sizes!r}, block_size={self.block_size}: multiples of 32")

    @property
    def recipe_steps(self) -> tuple[str, ...]:
        return tuple(_items(self.recipe))

    @property
    def crop_sizes(self) -> tuple[int, ...]:
        return tuple(int(s) for s in _items(self.sizes))


def _items(text: str) -> list[str]:
    """``a+b`` (or ``"a,b"`` quoted in pipeline text) as ``[a, b]``."""
    return re.split(r"[+,;\s]+", text.strip()) if text.strip() else []
