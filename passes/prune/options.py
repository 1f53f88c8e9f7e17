"""Options and report of ``prune``: what a user asks for, and what the pass did."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detc.passes.distill import DistillResult
from detc.passes.prune.reconstruct import DEFAULT_RIDGE

IMPORTANCE = ("auto", "l1", "l2", "bn", "data", "lsq")
SCOPES = ("layer", "global")
ALLOCATIONS = ("auto", "consumers", "outputs")
PROBE_METRICS = ("auto", "detections", "heads")


def _option(default: Any, help: str) -> Any:
    """A dataclass field whose ``metadata["help"]`` documents it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PruneOptions:
    """Options of ``prune`` (pipeline text: ``prune{ratio=0.3,calib=DIR}``).

    Each field's ``metadata["help"]`` says what it does (for ``detc passes -v``).
    """

    ratio: float = _option(
        0.25, "fraction of the prunable channels to remove: of every group (scope=layer) or overall"
    )
    mac_reduction: float | None = _option(
        None, "stop once this fraction of the model's MACs is removed (overrides ratio)"
    )
    scope: str = _option(
        "global",
        "layer: every group loses `ratio`; global: groups compete for cuts by how little each "
        "hurts per MAC saved (reconstruction error with calib, relative importance without)",
    )
    importance: str = _option(
        "auto",
        "which channels of a group go first: l1 / l2 (filter norm), bn (BatchNorm scale), data "
        "(activation energy x consumer weight), lsq (those least squares best makes up for); "
        "auto: lsq with calib, else l2",
    )
    multiple: int = _option(
        16,
        "kept channel counts are multiples of this: 16 fp32 lanes suit AVX-512 (onnxruntime's "
        "NCHWc kernels need it) and are whole multiples of AVX2's 8 and NEON's 4",
    )
    max_ratio: float = _option(0.5, "no group loses more than this fraction of its channels")
    allocation: str = _option(
        "auto",
        "how scope=global shares the cut among groups: consumers (by the least-squares error of "
        "the Convs reading each group: cheap, blind to what follows) or outputs (each group cut "
        "alone at a few depths, its effect measured on the model's outputs: detections against "
        "the original's when the model spec's decoder reads them, else the head Convs' "
        "outputs); auto: outputs with calib",
    )
    probe_images: int = _option(
        32,
        "calibration images each trial cut of allocation=outputs is measured on (at most "
        "calib_images); yolov5n -20 % MACs: 16 left mAP 14.3, 32 left 18.4 (seed 1: 15.7; less "
        "noisy trials, fewer groups cut), 64 with calib_images=64 18.5 in 2.4x the time",
    )
    probe_metric: str = _option(
        "auto",
        "what a trial cut of allocation=outputs is scored by: detections (1 - mAP@[.5:.95] of "
        "its detections against the original's confident ones) or heads (YOLOv5 heads: "
        "objectness and class KL, boxes in grid and anchor units, per expected object; "
        "continuous, so small cuts are told apart on few images; recover's own loss, so it needs "
        "torch); both fall back to the head "
        "Convs' relative squared error when the outputs do not decode; auto: detections "
        "(yolov5n -20 % MACs, 16 trial images: heads left mAP 11.1 / mAP50 25.4, detections "
        "14.3 / 24.5: heads cut the late P4/P5 layers, which costs box precision)",
    )
    calib: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "folder of images (or a COCO dataset folder) for data-aware importance and recovery"
    )
    calib_images: int = _option(32, "how many calibration images to draw (with `seed`)")
    spec: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "preprocessing of the calib images (model spec JSON/TOML); default: inferred"
    )
    samples: int = _option(512, "output pixels sampled per image and layer for the statistics")
    recover: bool = _option(
        True, "refit the Convs reading cut channels by least squares on calib (needs calib)"
    )
    ridge: float | None = _option(
        None,
        "ridge of the refit, relative to the mean diagonal of its normal equations; it pulls "
        "towards the original weights (inf: keep them, refit the bias only). Unset: chosen per "
        "Conv (sequential refit, 4+ images) from 1e-6..10 and inf, the one whose fit on 3/4 of "
        "the calibration images errs least on the rest; 1e-4 where it cannot be chosen",
    )
    mean_shift: bool = _option(
        True,
        "with recover=false and calib: move the cut channels' mean contribution into the "
        "biases of the Convs reading them (the weights stay sliced)",
    )
    sequential: bool = _option(
        True,
        "refit level by level, each Conv on the pruned model's own activations (what it will "
        "really read) against the original's outputs (one calibration run per level); else "
        "refit the cut Convs in one shot on the original's activations",
    )
    downstream: bool = _option(
        False,
        "sequential: also refit every uncut Conv downstream of a cut (to absorb the drift); "
        "with a few dozen calibration images this fits their noise more than it helps",
    )
    distill_steps: int = _option(
        0,
        "after the refit, train every Conv this many Adam steps so that the pruned model's Conv "
        "outputs match the original's on augmented calibration images (label-free "
        "distillation; needs calib and torch: pip install 'detc[torch]'); 0: off",
    )
    distill_size: int = _option(
        320,
        "side of the square training crops of distillation (a multiple of the model's largest "
        "stride: 32 for YOLO); smaller is faster, Convs do not depend on the image size",
    )
    distill_batch: int = _option(4, "training inputs per distillation step")
    distill_lr: float = _option(1e-4, "Adam learning rate of distillation (cosine-decayed)")
    distill_features: bool = _option(
        True,
        "distillation matches every Conv output the pruned model shares with the original "
        "(else only the detection heads)",
    )
    seed: int = _option(0, "seed of every random draw (calibration images, sampled pixels)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must be in [0, 1)")
        if self.mac_reduction is not None and not 0.0 <= self.mac_reduction < 1.0:
            raise ValueError(f"mac_reduction={self.mac_reduction} must be in [0, 1)")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r} must be one of {', '.join(SCOPES)}")
        if self.importance not in IMPORTANCE:
            raise ValueError(
                f"importance={self.importance!r} must be one of {', '.join(IMPORTANCE)}"
            )
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"allocation={self.allocation!r} must be one of {', '.join(ALLOCATIONS)}"
            )
        if self.probe_metric not in PROBE_METRICS:
            raise ValueError(
                f"probe_metric={self.probe_metric!r} must be one of {', '.join(PROBE_METRICS)}"
            )
        if self.allocation == "outputs" and self.calib is None:
            raise ValueError("allocation=outputs needs calib=DIR (calibration images)")
        if self.ridge is not None and not self.ridge >= 0.0:
            raise ValueError(f"ridge={self.ridge} must not be negative")
        if self.importance in ("data", "lsq") and self.calib is None:
            raise ValueError(f"importance={self.importance} needs calib=DIR (calibration images)")
        if self.multiple < 1:
            raise ValueError(f"multiple={self.multiple} must be at least 1")
        if not 0.0 < self.max_ratio < 1.0:
            raise ValueError(f"max_ratio={self.max_ratio} must be in (0, 1)")
        if self.distill_steps < 0 or self.distill_batch < 1 or self.distill_size < 1:
            raise ValueError("distill_steps must not be negative, distill_batch/size positive")
        if not self.distill_lr > 0.0:
            raise ValueError(f"distill_lr={self.distill_lr} must be positive")
        if self.distill_steps > 0 and self.calib is None:
            raise ValueError("distill_steps needs calib=DIR (calibration images)")
        if self.calib_images < 1 or self.samples < 1 or self.probe_images < 1:
            raise ValueError("calib_images, samples and probe_images must be at least 1")


# --- report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupDecision:
    name: str
    channels: int
    kept: int
    reason: str = ""  # why the group was left whole


@dataclass(frozen=True)
class LayerFit:
    """Relative squared error of one Conv's output (vs the original): before and after refit."""

    name: str
    error_before: float
    error_after: float
    ridge: float = 0.0  # the ridge of the refit (inf: weights kept, bias refit)

    def to_dict(self) -> dict[str, Any]:
        ridge: float | str = self.ridge if math.isfinite(self.ridge) else "inf"
        return {**vars(self), "ridge": ridge}


@dataclass
class PruneReport:
    options: str
    importance: str
    macs_before: int
    macs_after: int
    groups: list[GroupDecision] = field(default_factory=list)
    fits: list[LayerFit] = field(default_factory=list)
    output_error_before: float | None = None  # relative squared error of the graph outputs
    output_error_after: float | None = None
    calib_images: int = 0
    seconds: float = 0.0
    allocation: str = "consumers"
    probe_metric: str | None = None  # what allocation=outputs measured
    probes: list[ProbeCut] = field(default_factory=list)
    recovery: str = "none"  # least squares, mean shift or none
    probe_images: int = 0
    distill: DistillResult | None = None

    @property
    def mac_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "importance": self.importance,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "mac_reduction": round(self.mac_reduction, 4),
            "calib_images": self.calib_images,
            "allocation": self.allocation,
            "probe_metric": self.probe_metric,
            "probe_images": self.probe_images,
            "probes": [vars(p) for p in self.probes],
            "recovery": self.recovery,
            "output_error_before": self.output_error_before,
            "output_error_after": self.output_error_after,
            "groups": [vars(g) for g in self.groups],
            "fits": [f.to_dict() for f in self.fits],
            "distill": None if self.distill is None else vars(self.distill),
            "seconds": round(self.seconds, 2),
        }

    def table(self) -> str:
        cut = [g for g in self.groups if g.kept < g.channels]
        lines = [
            f"prune: {len(cut)} of {len(self.groups)} channel groups cut, MACs "
            f"{self.macs_before / 1e6:,.1f} M -> {self.macs_after / 1e6:,.1f} M "
            f"(-{100 * self.mac_reduction:.1f} %), importance {self.importance}, allocation "
            f"{self.allocation}, recovery {self.recovery}",
        ]
        if self.probes:
            lines.append(
                f"trial cuts on {self.probe_images} calibration images, each group alone "
                f"({self.probe_metric}):"
            )
            for p in self.probes:
                lines.append(
                    f"  {p.name[:48]:<48} -{p.units:<4} MACs -{p.macs_saved / 1e6:7.1f} M "
                    f"distortion {p.distortion:.4f}"
                )
        for g in self.groups:
            state = f"{g.channels:>4} -> {g.kept:<4}" if not g.reason else f"kept: {g.reason}"
            lines.append(f"  {g.name[:48]:<48} {state}")
        if self.fits:
            lines.append(
                f"recovery on {self.calib_images} calibration images "
                "(relative error of each refit Conv's output, before -> after; ridge):"
            )
            for fit in self.fits:
                lines.append(
                    f"  {fit.name[:48]:<48} {fit.error_before:9.4f} -> {fit.error_after:9.4f}"
                    f"  {fit.ridge:g}"
                )
        if self.distill is not None:
            d = self.distill
            outcome = "" if d.kept else " (worse on the check images: refit weights kept)"
            lines.append(
                f"distillation: {d.steps} steps in {d.seconds:.0f} s, {d.targets} Conv outputs "
                f"matched ({d.heads} heads), loss {d.loss_before:.4f} -> {d.loss_after:.4f}"
                f"{outcome}"
            )
        if self.output_error_before is not None:
            after = f"{self.output_error_after:.5f}" if self.output_error_after is not None else "-"
            lines.append(
                f"graph outputs, relative squared error: {self.output_error_before:.5f} sliced, "
                f"{after} after {self.recovery}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class ProbeCut:
    """One trial of allocation=outputs: ``units`` of a group cut alone, and what it did."""

    name: str
    units: int
    macs_saved: int
    distortion: float


def fixed_ridge(opts: PruneOptions) -> float:
    """The ridge of refits that have no held-back images to choose one on."""
    return DEFAULT_RIDGE if opts.ridge is None else opts.ridge
