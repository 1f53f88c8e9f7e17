"""Train the demo detector on synthetic shapes, on CPU, and ship it as ONNX + a model spec.

Recipe (small on purpose; the task is our own synthetic one):

- data: ``synth.generate_dataset`` train and held-out val splits, kept in memory; every batch
  gets a random flip / transpose (the 8 symmetries of the square map shapes to shapes).
- assignment: a ground-truth box belongs to the levels whose size band holds its longer side;
  at each such level the 2x2 cells whose centres lie within one stride of the box centre are
  positives (the decode reaches them, see ``demo_model``); a cell claimed by two boxes goes to
  the smaller one.
- loss: 1 - GIoU on decoded positive boxes; BCE objectness towards the (detached) IoU of the
  predicted box, so scores rank boxes by quality; BCE one-hot classes on positives.
- optimiser: AdamW, linear warm-up then cosine decay, weight EMA; the EMA weights are exported.

The exported ONNX keeps BatchNormalization nodes (detc's fold-conv-bn pass is meant to remove
them), and the final figures come from running that ONNX file in onnxruntime on the val split.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detc.compiler.demo import synth
from detc.compiler.demo.model import (
    INPUT_NAME,
    OUTPUT_NAME,
    STRIDES,
    DemoDetector,
    build_demo_model,
    count_flops,
    count_parameters,
    decode_boxes,
    export_onnx,
    flatten_level,
    level_grid,
)
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError

ONNX_FILE = "demo_detector.onnx"
SPEC_FILE = "demo_detector.json"

#: the longer box side (pixels) each level learns, as multiples of its stride; bands overlap so
#: boxes near a boundary train both levels
_SIZE_BANDS_IN_STRIDES = ((0.0, 6.0), (2.0, 6.0), (2.25, math.inf))
_LOSS_WEIGHTS = {"box": 5.0, "obj": 1.0, "cls": 1.0}
#: seed offset of the held-out val split: its images never coincide with training images
VAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (recorded next to the model)."""

    seed: int = 0
    n_train: int = 2500
    n_val: int = 300
    image_size: int = 256
    epochs: int = 12
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 150
    ema_decay: float = 0.998
    num_threads: int = 2
    #: stop early (and compress the LR schedule accordingly) after this many seconds; None: run
    #: every epoch (the only fully reproducible setting)
    time_budget_s: float | None = None
    #: stop after this many optimiser steps (smoke tests); None: all epochs
    max_steps: int | None = None


@dataclass(frozen=True)
class TrainResult:
    onnx_path: Path
    spec_path: Path
    map50_val: float
    map_val: float
    seconds: float
    steps: int
    parameters: int
    gflops: float
    losses: tuple[float, ...]  # mean training loss per epoch (or per partial epoch)


# --- public entry points ---------------------------------------------------------------------


def train_demo(
    out_dir: Path,
    *,
    config: TrainConfig | None = None,
    data_dir: Path | None = None,
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> TrainResult:
    """Generate data, train, export ``out_dir/demo_detector.{onnx,json}`` and evaluate it.

    ``overrides`` replace fields of ``config`` (e.g. ``epochs=3, seed=1``). Synthetic splits go
    to ``data_dir/{train,val}`` when given (kept), else to a temporary folder (removed).
    """
    config = _with_overrides(config or TrainConfig(), overrides)
    emit = log or (lambda _message: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scratch = None
    if data_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="detc-demo-data."))
        data_dir = scratch
    try:
        train_dir = synth.generate_dataset(
            Path(data_dir) / "train", config.n_train, config.seed, config.image_size
        )
        val_dir = synth.generate_dataset(
            Path(data_dir) / "val", config.n_val, val_seed(config.seed), config.image_size
        )
        emit(f"data: {config.n_train} train / {config.n_val} val images in {data_dir} "
             f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
        model, steps, losses = fit(train_dir, config, val_dir=val_dir, log=emit)
        onnx_path = export_onnx(
            model, out_dir / ONNX_FILE, (config.image_size,) * 2, synth.class_names()
        )
        spec = demo_spec(config.image_size)
        metrics = evaluate_onnx(onnx_path, val_dir, spec)
        seconds = time.perf_counter() - start
        emit(f"val (onnxruntime): mAP@0.5 {metrics['map50']:.3f}  mAP@[.5:.95] {metrics['map']:.3f}"
             f"  total {seconds:.0f} s")  # fmt: skip
        spec_path = write_demo_spec(
            out_dir / SPEC_FILE,
            spec,
            synth_record={
                "image_size": config.image_size,
                "val_seed": val_seed(config.seed),
                "n_val": config.n_val,
                "train_seed": config.seed,
                "n_train": config.n_train,
            },
            trained_record={
                "map50_val": round(metrics["map50"], 4),
                "map_val": round(metrics["map"], 4),
                "seconds": round(seconds, 1),
                "seed": config.seed,
                "steps": steps,
                "config": asdict(config),
            },
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(
        onnx_path=onnx_path,
        spec_path=spec_path,
        map50_val=metrics["map50"],
        map_val=metrics["map"],
        seconds=seconds,
        steps=steps,
        parameters=count_parameters(model),
        gflops=count_flops(model, (config.image_size,) * 2) / 1e9,
        losses=tuple(losses),
    )


def val_seed(train_seed: int) -> int:
    """Seed of the held-out val split that goes with a training seed."""
    return train_seed + VAL_SEED_OFFSET


def demo_spec(image_size: int = 256) -> ModelSpec:
    """The preprocessing / decoding contract of the demo detector."""
    return ModelSpec(
        input_name=INPUT_NAME,
        input_size=(image_size, image_size),
        resize="letterbox",
        pad_value=114.0,
        channel_order="RGB",
        scale=1.0 / 255.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        layout="NCHW",
        dtype="float32",
        decoder="demo",
        class_names=synth.class_names(),
        category_ids=tuple(synth.category_ids()),
        score_threshold=0.001,
        iou_threshold=0.65,
    )


def write_demo_spec(
    path: Path, spec: ModelSpec, *, synth_record: dict[str, Any], trained_record: dict[str, Any]
) -> Path:
    """The spec as JSON plus the ``synth`` and ``trained`` records (atomic write)."""
    path = Path(path)
    payload = spec.to_dict()
    payload.pop("pad_align", None)  # default ("center"), as for YOLOv5
    payload.pop("max_detections", None)
    payload["synth"] = synth_record
    payload["trained"] = trained_record
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path


# --- training --------------------------------------------------------------------------------


def fit(
    train_dir: Path,
    config: TrainConfig,
    *,
    val_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[DemoDetector, int, list[float]]:
    """Train on a synthetic dataset folder; returns the EMA model (eval mode), steps, losses."""
    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    images, boxes, labels = synth.load_dataset(train_dir)
    if images.shape[1:3] != (config.image_size, config.image_size):
        raise BadInputError(
            f"{train_dir}: images are {images.shape[2]}x{images.shape[1]}, the run is "
            f"configured for {config.image_size}: regenerate the data or change image_size"
        )
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 NCHW, converted per batch
    model = build_demo_model(len(synth.class_names()))
    ema = _ModelEma(model, config.ema_decay)
    optimizer = _make_optimizer(model, config)
    steps_per_epoch = max(len(images) // config.batch_size, 1)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    criterion = DetectionLoss(len(synth.class_names()), config.image_size)
    size = (config.image_size, config.image_size)
    log(
        f"model: {count_parameters(model) / 1e6:.2f} M parameters, "
        f"{count_flops(model, size) / 1e9:.2f} GFLOPs at {size[0]}x{size[1]}; "
        f"{total_steps} steps of {config.batch_size} images on {config.num_threads} thread(s)"
    )
    val_spec = demo_spec(config.image_size)
    start = time.perf_counter()
    step = 0
    epoch_losses: list[float] = []
    for epoch in range(config.epochs):
        order = rng.permutation(len(images))
        running, count = 0.0, 0
        model.train()
        for first in range(0, steps_per_epoch * config.batch_size, config.batch_size):
            progress = step / total_steps
            if config.time_budget_s is not None:
                progress = max(progress, (time.perf_counter() - start) / config.time_budget_s)
            if progress >= 1.0:
                break
            _set_learning_rate(optimizer, config, step, progress)
            index = order[first : first + config.batch_size]
            batch, batch_boxes, batch_labels = _augment(
                pixels[index], [boxes[i] for i in index], [labels[i] for i in index], rng
            )
            loss, _parts = criterion(model.forward_raw(batch), batch_boxes, batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            optimizer.step()
            ema.update(model)
            step += 1
            running += float(loss.detach())
            count += 1
        if count:
            epoch_losses.append(running / count)
        message = (
            f"epoch {epoch + 1}/{config.epochs}: step {step}, loss {running / max(count, 1):.4f}"
        )
        if val_dir is not None:
            quick = evaluate_torch(ema.model, val_dir, val_spec, max_images=100)
            message += f", val100 mAP@0.5 {quick['map50']:.3f} mAP {quick['map']:.3f}"
        log(f"{message} ({time.perf_counter() - start:.0f} s)")
        if count == 0 or step >= total_steps:
            break
    ema.model.eval()
    return ema.model, step, epoch_losses


class DetectionLoss(nn.Module):
    """Centre-sampling assignment + GIoU / IoU-aware objectness / class BCE (see module doc)."""

    def __init__(self, num_classes: int, image_size: int, strides: Sequence[int] = STRIDES) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.image_size = image_size

    def forward(
        self,
        levels: Sequence[torch.Tensor],
        boxes: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``boxes[b]`` (K, 4) x0, y0, x1, y1 pixels and ``labels[b]`` (K,) of image b."""
        flat = torch.cat([flatten_level(level) for level in levels], dim=1)  # (B, N, 5 + C)
        grids, strides, _ = self._anchors(levels)
        batch_index, anchor_index, target_boxes, target_labels = self._assign(levels, boxes, labels)
        device = flat.device
        objectness_target = torch.zeros(flat.shape[:2], device=device)
        # YOLOX's normalisation: every term is a sum divided by the number of positives, so the
        # class and box signals are not diluted by the thousands of background cells
        positives = max(int(anchor_index.numel()), 1)
        if anchor_index.numel():
            chosen = flat[batch_index, anchor_index]
            predicted = _cxcywh_to_xyxy(
                decode_boxes(chosen, grids[anchor_index], 1)
                * strides[anchor_index, None].to(chosen.dtype)
            )
            giou, iou = _giou(predicted, target_boxes)
            box_loss = (1.0 - giou).sum() / positives
            objectness_target[batch_index, anchor_index] = iou.detach().clamp(min=0.0)
            class_target = F.one_hot(target_labels, self.num_classes).to(chosen.dtype)
            class_loss = (
                F.binary_cross_entropy_with_logits(chosen[:, 5:], class_target, reduction="sum")
                / positives
            )
        else:
            box_loss = flat.sum() * 0.0
            class_loss = flat.sum() * 0.0
        objectness_loss = (
            F.binary_cross_entropy_with_logits(flat[..., 4], objectness_target, reduction="sum")
            / positives
        )
        total = (
            _LOSS_WEIGHTS["box"] * box_loss
            + _LOSS_WEIGHTS["obj"] * objectness_loss
            + _LOSS_WEIGHTS["cls"] * class_loss
        )
        parts = {
            "box": float(box_loss.detach()),
            "obj": float(objectness_loss.detach()),
            "cls": float(class_loss.detach()),
        }
        return total, parts

    def _anchors(
        self, levels: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per anchor (row of ``output0``): its cell (gx, gy), stride and level index.

        ``decode_boxes(logits, grid, 1) * stride`` equals ``decode_boxes(logits, grid, stride)``,
        which lets positives of all levels be decoded in one call.
        """
        grids, strides, level_of = [], [], []
        for index, (level, stride) in enumerate(zip(levels, self.strides, strict=True)):
            height, width = int(level.shape[2]), int(level.shape[3])
            grids.append(level_grid(height, width, level.device))
            strides.append(torch.full((height * width,), float(stride), device=level.device))
            level_of.append(torch.full((height * width,), index, device=level.device))
        return torch.cat(grids), torch.cat(strides), torch.cat(level_of)

    def _assign(
        self,
        levels: Sequence[torch.Tensor],
        boxes: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positives: (batch index, anchor index, target box xyxy, target label), one per anchor."""
        all_boxes = [b.reshape(-1, 4).double().numpy() for b in boxes]
        rows_b, rows_anchor, rows_gt, rows_area = [], [], [], []
        offset = 0
        gt_boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
        gt_labels = (
            np.concatenate([lab.reshape(-1).numpy() for lab in labels])
            if labels
            else np.zeros(0, np.int64)
        )
        gt_batch = np.concatenate(
            [np.full(len(b), i, dtype=np.int64) for i, b in enumerate(all_boxes)]
        )
        centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        sizes = gt_boxes[:, 2:] - gt_boxes[:, :2]
        longer = sizes.max(axis=1)
        areas = sizes.prod(axis=1)
        gt_index = np.arange(len(gt_boxes))
        for level, stride in zip(levels, self.strides, strict=True):
            height, width = int(level.shape[2]), int(level.shape[3])
            low, high = _SIZE_BANDS_IN_STRIDES[self.strides.index(stride)]
            here = (longer > low * stride) & (longer <= high * stride)
            # the two cells per axis whose centres lie within one stride of the box centre
            base = np.floor(centres[here] / stride - 0.5).astype(np.int64)
            for dx in (0, 1):
                for dy in (0, 1):
                    gx = np.clip(base[:, 0] + dx, 0, width - 1)
                    gy = np.clip(base[:, 1] + dy, 0, height - 1)
                    rows_b.append(gt_batch[here])
                    rows_anchor.append(offset + gy * width + gx)
                    rows_gt.append(gt_index[here])
                    rows_area.append(areas[here])
            offset += height * width
        if not rows_b or not sum(len(r) for r in rows_b):
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty, torch.zeros(0, 4), empty
        batch_of = np.concatenate(rows_b)
        anchor_of = np.concatenate(rows_anchor)
        gt_of = np.concatenate(rows_gt)
        area_of = np.concatenate(rows_area)
        # one owner per (image, anchor): the smallest box, ties to the first listed
        order = np.lexsort((gt_of, area_of, anchor_of, batch_of))
        key = batch_of[order] * offset + anchor_of[order]
        _, first = np.unique(key, return_index=True)
        pick = order[first]
        return (
            torch.from_numpy(batch_of[pick]),
            torch.from_numpy(anchor_of[pick]),
            torch.from_numpy(gt_boxes[gt_of[pick]]).float(),
            torch.from_numpy(gt_labels[gt_of[pick]].astype(np.int64)),
        )


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    centre, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def _giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised IoU and IoU of matched (N, 4) xyxy boxes."""
    inter_wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    union = area_a + area_b - inter + eps
    iou = inter / union
    hull_wh = torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1] + eps
    return iou - (hull - union) / hull, iou


def _augment(
    batch: torch.Tensor,
    boxes: list[np.ndarray],
    labels: list[np.ndarray],
    rng: np.random.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Random symmetry of the square per image; uint8 NCHW → float [0, 1]."""
    size = batch.shape[-1]
    images, out_boxes = [], []
    for image, image_boxes in zip(batch, boxes, strict=True):
        flip_x, flip_y, transpose = (bool(v) for v in rng.integers(0, 2, size=3))
        xyxy = image_boxes.astype(np.float32).copy()
        if transpose:
            image = image.transpose(1, 2)
            xyxy = xyxy[:, [1, 0, 3, 2]]
        if flip_x:
            image = image.flip(2)
            xyxy[:, [0, 2]] = size - xyxy[:, [2, 0]]
        if flip_y:
            image = image.flip(1)
            xyxy[:, [1, 3]] = size - xyxy[:, [3, 1]]
        images.append(image)
        out_boxes.append(torch.from_numpy(xyxy))
    stacked = torch.stack(images).float().div_(255.0)
    return stacked, out_boxes, [torch.from_numpy(lab) for lab in labels]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        # conv weights are regularised; BatchNorm scales/shifts and biases are not
        (decay if parameter.ndim == 4 and name.endswith("weight") else no_decay).append(parameter)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.999),
    )


def _set_learning_rate(
    optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, progress: float
) -> None:
    floor = 0.02
    cosine = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    warmup = min(1.0, (step + 1) / max(config.warmup_steps, 1))
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * cosine * warmup


class _ModelEma:
    """Exponential moving average of weights and BatchNorm statistics.

    The decay ramps up from 0 so the average is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.decay * (1.0 - math.exp(-self.updates / 200.0))
        source = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(source[name].detach(), alpha=1.0 - decay)
            else:
                value.copy_(source[name])


# --- evaluation ------------------------------------------------------------------------------


def evaluate_torch(
    model: nn.Module, dataset_dir: Path, spec: ModelSpec, *, max_images: int | None = None
) -> dict[str, float]:
    """COCO mAP of a torch model on a dataset folder, through detc's decoder and metrics."""
    was_training = model.training
    model.eval()

    def run(tensor: np.ndarray) -> dict[str, np.ndarray]:
        return {OUTPUT_NAME: model(torch.from_numpy(tensor)).numpy()}

    try:
        with torch.no_grad():
            return _run_and_score(run, dataset_dir, spec, max_images)
    finally:
        model.train(was_training)


def evaluate_onnx(
    onnx_path: Path, dataset_dir: Path, spec: ModelSpec, *, max_images: int | None = None
) -> dict[str, float]:
    """COCO mAP of an ONNX detector run in onnxruntime on a dataset folder."""
    import onnx

    from detc.compiler.reference import ort_session, run_session

    session = ort_session(onnx.load(str(onnx_path)), threads=2)

    def run(tensor: np.ndarray) -> dict[str, np.ndarray]:
        return run_session(session, {spec.input_name: tensor})

    return _run_and_score(run, dataset_dir, spec, max_images)


def _run_and_score(
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    dataset_dir: Path,
    spec: ModelSpec,
    max_images: int | None,
) -> dict[str, float]:
    from detc.compiler.detection.datasets import CocoDataset
    from detc.compiler.detection.decoders import Detections, decode
    from detc.compiler.detection.metrics import evaluate_coco

    dataset = CocoDataset(dataset_dir)
    detections: dict[int, Detections] = {}
    for sample in dataset.samples(spec, max_images=max_images):
        found = decode(spec.decoder, run(sample.tensor), spec)
        detections[sample.image_id] = found.with_boxes(
            sample.transform.boxes_to_original(found.boxes)
        )
    metrics = evaluate_coco(detections, dataset, spec.category_ids)
    return {"map50": metrics.map50, "map": metrics.map, "map75": metrics.map75}


def _with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise BadInputError(
            f"train_demo: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}"
        )
    fields = {**asdict(config), **overrides}
    return TrainConfig(**fields)
