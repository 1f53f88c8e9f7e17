"""End-to-end distillation: every Conv trained at once so the heads match the teacher's.

Each step draws augmented crops, runs the teacher on them (no gradient) and the student, and
takes an Adam step on the heads' error (:func:`detc.passes.recover.losses.head_loss`) plus
``features`` times the error of the shared features (plus, with annotated images, the detection
loss of :mod:`.labeled`). Crops grow from the smallest training side to the largest (progressive
resolution: small crops are cheap and teach the local features first), each side for an equal
share of the time or steps. The learning rate follows a cosine over the budget. Every so often
the student is measured on the held-out images (:class:`~detc.passes.recover.held_out.Measure`:
agreement of its detections with the teacher's, else the head loss); the best weights measured
are what the step returns (early stopping without a patience to tune).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from detc.passes.recover.data import AugmentedCrops
from detc.passes.recover.held_out import HeldOut, Measure
from detc.passes.recover.labeled import LabeledLoss
from detc.passes.recover.losses import LossTarget, features_loss, head_loss
from detc.passes.torch_graph import TorchGraph

#: held-out measurements per end-to-end run (besides the one at its start)
_CHECKS = 8


@dataclass
class TrainingCurve:
    """Held-out measures against training progress, for the report."""

    points: list[tuple[int, float, Measure]] = field(default_factory=list)  # (step, seconds, ...)
    best_step: int = 0
    steps: int = 0


def distill_end_to_end(
    student: TorchGraph,
    teacher: TorchGraph,
    crops: AugmentedCrops,
    held_out: HeldOut,
    start: Measure,
    targets: Sequence[LossTarget],
    input_name: str,
    *,
    sizes: Sequence[int],
    batch: int,
    features: float,
    lr_for: Callable[[str], float],
    seconds: float,
    steps: int | None,
    torch: Any,
    labeled: LabeledLoss | None = None,
    label_weight: float = 1.0,
    label_batch: int = 2,
    on_progress: Callable[[int, int, float, Measure | None], None] | None = None,
    on_check: Callable[[int, float], None] | None = None,
) -> TrainingCurve:
    """Train ``student`` in place for ``steps`` (or until ``seconds`` pass); keep the best.

    ``start`` is the student's held-out measure as it comes in (the caller has taken it)."""
    started = time.monotonic()
    wanted = [t.name for t in targets]
    names = list(student.parameters)
    base_lr = {name: lr_for(name) for name in names}
    optimizer = torch.optim.Adam(
        [{"params": [student.parameters[n]], "lr": base_lr[n]} for n in names]
    )
    curve = TrainingCurve()
    best = start
    curve.points.append((0, 0.0, best))
    best_weights = student.snapshot()
    check_every_seconds = seconds / _CHECKS
    next_check = check_every_seconds
    check_every_steps = max(1, steps // _CHECKS) if steps is not None else 0
    step = 0

    def progress_fraction() -> float:
        if steps is not None:
            return min(step / steps, 1.0)
        return min((time.monotonic() - started) / seconds, 1.0)

    while True:
        elapsed = time.monotonic() - started
        if elapsed >= seconds or (steps is not None and step >= steps):
            break
        fraction = progress_fraction()
        size = sizes[min(int(fraction * len(sizes)), len(sizes) - 1)]
        decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * fraction))
        for group, name in zip(optimizer.param_groups, names, strict=True):
            group["lr"] = base_lr[name] * decay
        inputs = crops.batch(batch, size)
        with torch.no_grad():
            expected = teacher.run({input_name: inputs}, wanted)
        got = student.run({input_name: inputs}, wanted)
        loss = head_loss(torch, got, expected, targets)
        if features > 0:
            loss = loss + features * features_loss(torch, got, expected, targets)
        if labeled is not None and label_weight > 0:
            loss = loss + label_weight * labeled.loss(student, label_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        elapsed = time.monotonic() - started
        due = step % check_every_steps == 0 if steps is not None else elapsed >= next_check
        measured = None
        if due:
            next_check += check_every_seconds
            measured = held_out.measure(student)
            curve.points.append((step, elapsed, measured))
            if on_check is not None:
                on_check(step, elapsed)
            if measured.better_than(best):
                best, curve.best_step = measured, step
                best_weights = student.snapshot()
        if on_progress is not None:
            on_progress(step, size, float(loss.detach()), measured)
    final = held_out.measure(student)
    curve.points.append((step, time.monotonic() - started, final))
    if final.better_than(best):
        best, curve.best_step = final, step
    else:
        student.restore(best_weights)
    curve.steps = step
    return curve
