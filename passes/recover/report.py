"""What ``recover`` did: the held-out measures before and after each step, and which were kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from detc.passes.recover.held_out import Measure


@dataclass(frozen=True)
class StepRecord:
    """One recovery step; one that made the held-out measure worse was undone (``kept`` False)."""

    step: str
    before: Measure
    after: Measure  # measured before any undo: what the step itself reached
    kept: bool
    seconds: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "held_out_loss_before": self.before.loss,
            "held_out_loss_after": self.after.loss,
            "held_out_agreement_before": self.before.agreement,
            "held_out_agreement_after": self.after.agreement,
            "kept": self.kept,
            "seconds": round(self.seconds, 2),
            "detail": self.detail,
        }


@dataclass
class RecoverReport:
    """The pass report of ``recover`` (manifest: ``to_dict()``; terminal: ``table()``)."""

    teacher: str
    train_images: int
    held_out_images: int
    targets: int
    heads: int
    budget_seconds: float
    judged_by: str = "head loss"  # what decided each step: "detections" or "head loss"
    initial: Measure = field(default_factory=lambda: Measure(0.0, 0.0))
    final: Measure = field(default_factory=lambda: Measure(0.0, 0.0))
    seconds: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    curve: list[tuple[int, float, Measure]] = field(default_factory=list)  # e2e (step, s, ...)

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "train_images": self.train_images,
            "held_out_images": self.held_out_images,
            "targets": self.targets,
            "heads": self.heads,
            "budget_seconds": self.budget_seconds,
            "judged_by": self.judged_by,
            "held_out_loss_initial": self.initial.loss,
            "held_out_feature_loss_initial": self.initial.feature_loss,
            "held_out_agreement_initial": self.initial.agreement,
            "held_out_loss_final": self.final.loss,
            "held_out_feature_loss_final": self.final.feature_loss,
            "held_out_agreement_final": self.final.agreement,
            "seconds": round(self.seconds, 2),
            "steps": [s.to_dict() for s in self.steps],
            "e2e_curve": [
                {
                    "step": s,
                    "seconds": round(t, 1),
                    "held_out_loss": m.loss,
                    "held_out_agreement": m.agreement,
                }
                for s, t, m in self.curve
            ],
        }

    def table(self) -> str:
        lines = [
            f"recover: teacher {self.teacher}; {self.train_images} training / "
            f"{self.held_out_images} held-out images; {self.targets} matched values "
            f"({self.heads} heads); {self.seconds / 60:.1f} of {self.budget_seconds / 60:.1f} min; "
            f"each step judged by {_JUDGES[self.judged_by]}",
            f"{'step':<8} {'head loss before':>16} {'after':>9} {'agreement before':>17} "
            f"{'after':>6}  {'':<9} {'time':>6}  detail",
        ]
        for s in self.steps:
            verdict = "kept" if s.kept else "REJECTED"
            lines.append(
                f"{s.step:<8} {s.before.loss:>16.5f} {s.after.loss:>9.5f} "
                f"{_percent(s.before.agreement):>17} {_percent(s.after.agreement):>6}  "
                f"{verdict:<9} {s.seconds:>5.0f}s  {s.detail}"
            )
        lines.append(
            f"held-out {self.initial.describe()} -> {self.final.describe()}; "
            f"feature loss {self.initial.feature_loss:.4f} -> {self.final.feature_loss:.4f}"
        )
        return "\n".join(lines)


#: what ``judged_by`` means, in the report's words
_JUDGES = {
    "detections": "held-out agreement (mAP@[.5:.95] against the teacher's confident detections)",
    "head loss": "held-out head loss (the outputs do not decode as detections)",
}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"
