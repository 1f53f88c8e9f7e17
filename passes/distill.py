"""Distillation: train a pruned model's Convs to reproduce the original's features, label-free.

Least squares refits one Conv at a time against the original's output; on a compact detector
the small errors it leaves compound through the layers after it. Distillation trains every Conv
of the pruned model (the *student*) at once, by gradient descent, so that its Conv outputs match
the original's (the *teacher*) on the same input: no labels, the teacher is the target.

The ONNX graph is executed as a torch function (:class:`detc.passes.torch_graph.TorchGraph`)
whose Conv weights and biases are the trainable parameters; the trained values are written back
into the initializers, so the model keeps its structure and names. Only the ops detectors are
built from are executed; any other raises :class:`BadInputError` naming it.

What is matched: the output of every Conv the student shares with the teacher (same name, same
channel count) — intermediate features, which constrain the fit far more than the outputs
alone — and the detection heads (Convs no other Conv reads; compared after the
Sigmoid their outputs go through, when they do). Each target counts by its error relative to the
teacher's variance there, so wide early layers do not drown the heads.

A few dozen calibration images are made into many inputs by label-free augmentation: random
rescaling and cropping at ``size`` x ``size`` (objects keep roughly their native scale, which is
what the model will see), 2 x 2 mosaics, horizontal flips and colour jitter. Training at a
reduced size is cheap, and what a Conv computes does not depend on the image size.

Measured on yolov5n pruned by 20 % of its MACs (32 calibration images of coco64, 150 steps at
512 px): mAP on the calibration images 31.5 → 36.0, on 32 other images 20.2 → 17.3. With so few
images it fits them and generalises worse; it is off by default (``distill_steps=0``).

torch is an optional dependency (``pip install detc[torch]``), imported only when training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.passes._graph_facts import constant_array
from detc.passes.torch_graph import TorchGraph, import_torch

logger = logging.getLogger(__name__)

#: letterbox padding of YOLO-style preprocessing, the colour an empty canvas starts with
_PAD_VALUE = 114.0 / 255.0
#: at most this many calibration images (unaugmented) measure the loss before and after
_CHECK_IMAGES = 4

#: ops whose output shape/layout is a rearrangement: a Sigmoid after them acts elementwise on
#: the head Conv's own values
_REARRANGING = frozenset({"Reshape", "Transpose", "Split", "Slice", "Identity", "Flatten"})


# --- what is matched --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A tensor the student must reproduce: a Conv output shared with the teacher."""

    name: str
    head: bool  # no Conv reads it (downstream): the model's interface
    sigmoid: bool  # compared after a Sigmoid (which every use of it goes through)


def _reaches_conv(value: ir.Value, seen: set[int]) -> bool:
    for user, _ in value.uses():
        if id(user) in seen:
            continue
        seen.add(id(user))
        if user.op_type == "Conv":
            return True
        if any(out is not None and _reaches_conv(out, seen) for out in user.outputs):
            return True
    return False


def _ends_in_sigmoid(value: ir.Value) -> bool:
    uses = list(value.uses())
    if not uses or value.is_graph_output():
        return False
    for user, _ in uses:
        if user.op_type == "Sigmoid":
            continue
        if user.op_type not in _REARRANGING:
            return False
        outputs = [o for o in user.outputs if o is not None]
        if not outputs or not all(_ends_in_sigmoid(o) for o in outputs):
            return False
    return True


def distill_targets(student: ir.Graph, teacher: ir.Graph, *, features: bool) -> list[Target]:
    """Conv outputs of ``student`` the teacher has too, with the same channel count."""
    teacher_channels: dict[str, int] = {}
    for node in teacher:
        if node.op_type == "Conv" and node.outputs[0].name:
            weight = constant_array(node.inputs[1])
            if weight is not None:
                teacher_channels[node.outputs[0].name] = int(weight.shape[0])
    targets = []
    for node in student:
        output = node.outputs[0] if node.outputs else None
        if node.op_type != "Conv" or output is None or not output.name:
            continue
        weight = constant_array(node.inputs[1])
        if weight is None or teacher_channels.get(output.name) != int(weight.shape[0]):
            continue
        head = not _reaches_conv(output, set())
        if head or features:
            targets.append(Target(output.name, head, head and _ends_in_sigmoid(output)))
    return targets


# --- label-free augmentation ------------------------------------------------------------------


def place_at_random(
    image: Any, height: int, width: int, pad_value: float, rng: np.random.Generator
) -> Any:
    """A (N, C, ``height``, ``width``) canvas of ``pad_value`` with the torch ``image`` at a
    random offset: cropped along a side where it is larger, padded where it is smaller."""
    rows, cols = image.shape[-2:]
    canvas = image.new_full((image.shape[0], image.shape[1], height, width), pad_value)
    top = int(rng.integers(min(0, rows - height), max(0, rows - height) + 1))
    left = int(rng.integers(min(0, cols - width), max(0, cols - width) + 1))
    src_top, src_left = max(top, 0), max(left, 0)
    dst_top, dst_left = src_top - top, src_left - left
    rows_copied = min(rows - src_top, height - dst_top)
    cols_copied = min(cols - src_left, width - dst_left)
    if rows_copied > 0 and cols_copied > 0:
        canvas[..., dst_top : dst_top + rows_copied, dst_left : dst_left + cols_copied] = image[
            ..., src_top : src_top + rows_copied, src_left : src_left + cols_copied
        ]
    return canvas


class _Views:
    """Random training inputs of ``size`` x ``size`` made from the calibration images."""

    def __init__(self, images: Sequence[np.ndarray], size: int, seed: int, torch: Any) -> None:
        self.torch = torch
        self.images = [torch.from_numpy(np.ascontiguousarray(i, dtype=np.float32)) for i in images]
        self.size = size
        self.rng = np.random.default_rng(seed)

    def _tile(self, image: Any, height: int, width: int) -> Any:
        """A ``height`` x ``width`` crop of ``image`` rescaled by a random factor around 1."""
        functional = self.torch.nn.functional
        scale = float(self.rng.uniform(0.6, 1.4))
        rows, cols = image.shape[-2:]
        new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
        resized = functional.interpolate(
            image, size=(new_rows, new_cols), mode="bilinear", align_corners=False
        )
        return place_at_random(resized, height, width, _PAD_VALUE, self.rng)

    def _pick(self) -> Any:
        return self.images[int(self.rng.integers(len(self.images)))]

    def view(self, mosaic: float) -> Any:
        size = self.size
        if self.rng.random() < mosaic:
            row = int(self.rng.integers(size // 4, 3 * size // 4 + 1))
            col = int(self.rng.integers(size // 4, 3 * size // 4 + 1))
            top = self.torch.cat(
                [self._tile(self._pick(), row, col), self._tile(self._pick(), row, size - col)],
                dim=3,
            )
            bottom = self.torch.cat(
                [
                    self._tile(self._pick(), size - row, col),
                    self._tile(self._pick(), size - row, size - col),
                ],
                dim=3,
            )
            out = self.torch.cat([top, bottom], dim=2)
        else:
            out = self._tile(self._pick(), size, size)
        if self.rng.random() < 0.5:
            out = out.flip(3)
        gains = self.rng.uniform(0.9, 1.1, size=out.shape[1]) * self.rng.uniform(0.75, 1.25)
        contrast = float(self.rng.uniform(0.8, 1.2))
        mean = out.mean()
        out = (out - mean) * contrast + mean
        out = out * self.torch.tensor(gains, dtype=out.dtype).reshape(1, -1, 1, 1)
        return out.clamp(0.0, 1.0)

    def batch(self, count: int, mosaic: float) -> Any:
        return self.torch.cat([self.view(mosaic) for _ in range(count)], dim=0)


# --- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 300
    size: int = 320
    batch: int = 4
    lr: float = 1e-4
    features: bool = True
    mosaic: float = 0.5  # share of training inputs that are 2 x 2 mosaics
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class DistillResult:
    loss_before: float  # on the unaugmented calibration images: the least-squares starting point
    loss_after: float
    steps: int
    seconds: float
    targets: int
    heads: int
    kept: bool  # the trained weights were kept (False: training made the check loss worse)


def _loss(
    torch: Any, student: dict[str, Any], teacher: dict[str, Any], targets: list[Target]
) -> Any:
    """Mean over features plus mean over heads of the error relative to the teacher's variance."""
    feature_terms: list[Any] = []
    head_terms: list[Any] = []
    for target in targets:
        s, t = student[target.name], teacher[target.name]
        if target.sigmoid:
            s, t = torch.sigmoid(s), torch.sigmoid(t)
        spread = t.var(dim=(0, 2, 3), keepdim=True).mean() + 1e-8 if t.dim() == 4 else t.var()
        term = ((s - t) ** 2).mean() / (spread + 1e-8)
        (head_terms if target.head else feature_terms).append(term)
    total = torch.stack(head_terms).mean() if head_terms else 0.0
    if feature_terms:
        total = total + torch.stack(feature_terms).mean()
    return total


def distill(
    student: ir.Model,
    teacher: ir.Model,
    images: Sequence[np.ndarray],
    settings: DistillSettings,
    input_name: str | None = None,
) -> DistillResult:
    """Train ``student``'s Conv weights/biases (in place) to match ``teacher`` on ``images``.

    ``images`` are preprocessed model inputs, each (1, C, H, W). The loss is checked before and
    after on the unaugmented images; if training made it worse, the starting weights are kept.
    """
    torch = import_torch()
    started = time.perf_counter()
    if not images:
        raise BadInputError("distillation needs calibration images (calib=DIR)")
    name = input_name or student.graph.inputs[0].name
    assert name is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        torch.manual_seed(settings.seed)
        targets = distill_targets(student.graph, teacher.graph, features=settings.features)
        if not targets:
            raise BadInputError(
                f"model '{student.graph.name}': no Conv output of the pruned model matches the "
                "original's; nothing to distill (set distill_steps=0)"
            )
        wanted = [t.name for t in targets]
        student_graph = TorchGraph(student.graph, trainable=True)
        teacher_graph = TorchGraph(teacher.graph)
        checks = list(images[:_CHECK_IMAGES])
        with torch.no_grad():
            expected_checks = [teacher_graph.run({name: image}, wanted) for image in checks]

        def check_loss() -> float:
            with torch.no_grad():
                losses = [
                    float(_loss(torch, student_graph.run({name: image}, wanted), expected, targets))
                    for image, expected in zip(checks, expected_checks, strict=True)
                ]
            return sum(losses) / len(losses)

        before = check_loss()
        start_weights = student_graph.snapshot()
        parameters = list(student_graph.parameters.values())
        optimizer = torch.optim.Adam(parameters, lr=settings.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(settings.steps, 1), eta_min=settings.lr * 0.05
        )
        views = _Views(images, settings.size, settings.seed, torch)
        running = 0.0
        for step in range(settings.steps):
            batch = views.batch(settings.batch, settings.mosaic)
            with torch.no_grad():
                expected = teacher_graph.run({name: batch}, wanted)
            loss = _loss(torch, student_graph.run({name: batch}, wanted), expected, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            if (step + 1) % 25 == 0:
                logger.info("distill step %d: training loss %.4f", step + 1, running / 25)
                running = 0.0
        after = check_loss()
        kept = after < before
        if not kept:
            student_graph.restore(start_weights)
            after = before
        student_graph.write_back()
        return DistillResult(
            before,
            after,
            settings.steps,
            time.perf_counter() - started,
            len(targets),
            sum(t.head for t in targets),
            kept,
        )
    finally:
        torch.set_num_threads(threads)
