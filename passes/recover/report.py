"""What ``recover`` did: the held-out loss before and after each step, and which were kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """One recovery step; a step that made the held-out loss worse was undone (``kept`` False)."""

    step: str
    loss_before: float
    loss_after: float  # measured before any undo: what the step itself reached
    kept: bool
    seconds: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "held_out_loss_before": self.loss_before,
            "held_out_loss_after": self.loss_after,
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
    initial_loss: float = 0.0
    initial_feature_loss: float = 0.0
    final_loss: float = 0.0
    final_feature_loss: float = 0.0
    seconds: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # e2e (step, s, loss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "train_images": self.train_images,
            "held_out_images": self.held_out_images,
            "targets": self.targets,
            "heads": self.heads,
            "budget_seconds": self.budget_seconds,
            "held_out_loss_initial": self.initial_loss,
            "held_out_feature_loss_initial": self.initial_feature_loss,
            "held_out_loss_final": self.final_loss,
            "held_out_feature_loss_final": self.final_feature_loss,
            "seconds": round(self.seconds, 2),
            "steps": [s.to_dict() for s in self.steps],
            "e2e_curve": [
                {"step": s, "seconds": round(t, 1), "held_out_loss": v} for s, t, v in self.curve
            ],
        }

    def table(self) -> str:
        lines = [
            f"recover: teacher {self.teacher}; {self.train_images} training / "
            f"{self.held_out_images} held-out images; {self.targets} matched values "
            f"({self.heads} heads); {self.seconds / 60:.1f} of {self.budget_seconds / 60:.1f} min",
            f"{'step':<8} {'held-out before':>16} {'after':>12}  {'':<9} {'time':>7}  detail",
        ]
        for s in self.steps:
            verdict = "kept" if s.kept else "REJECTED"
            lines.append(
                f"{s.step:<8} {s.loss_before:>16.5f} {s.loss_after:>12.5f}  {verdict:<9} "
                f"{s.seconds:>6.0f}s  {s.detail}"
            )
        lines.append(
            f"held-out head loss {self.initial_loss:.5f} -> {self.final_loss:.5f}; "
            f"feature loss {self.initial_feature_loss:.4f} -> {self.final_feature_loss:.4f}"
        )
        return "\n".join(lines)
