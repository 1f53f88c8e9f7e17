"""prune: structured channel pruning that really removes channels, then refits what reads them.

Three steps, each in its own section below:

1. **Groups** (``passes/_channel_groups.py``): which channels must go together.
2. **Choice**: which channels of a group go first (importance) and how many per group
   (allocation: a uniform ratio per layer, or a global competition).
3. **Recovery**: with calibration images, every Conv that lost input channels is refit by least
   squares so that it reproduces its *original* output: ``min ||W x + b - (W' x' + b')||^2``
   over sampled output pixels, with ``x'`` the surviving im2col patch and a constant column for
   the bias (``passes/_reconstruct.py``). ``sequential`` does it level by level on the pruned
   model's own activations, so each refit also absorbs the drift of the cuts before it.
   A few dozen images do not pin down a Conv with a thousand inputs: each refit's ridge (towards
   the sliced original weights) is the one whose fit on three quarters of the images errs least
   on the rest.
   Without a refit, ``mean_shift`` still moves the cut channels' mean into the biases.

The ``lsq`` importance ranks channels the way recovery will judge them: it removes, one at a
time, the channel whose loss the others can best make up for (the least-squares error after an
optimal refit grows least), updating the inverse Gram matrix as it goes — the structured form of
Optimal Brain Surgeon on a layer-wise reconstruction objective.

How much each group loses is the real question on a compact detector: a cut that its consumers
reconstruct well can still ruin the boxes three layers later. ``allocation=outputs`` therefore
measures it: each group is cut alone at a few depths (consumers refit in one shot) and the
model's outputs on calibration images are compared with the original's — as detections when
the model spec's decoder reads them. The global competition then spends the MAC budget where
the measured damage per MAC saved is least.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.detection.decoders import Detections, decode
from detc.compiler.detection.spec import ModelSpec, load_spec, spec_from_onnx
from detc.compiler.errors import BadInputError
from detc.compiler.ir.pass_base import Candidate, DetcPass, PassResult, node_label
from detc.compiler.reference import ort_session, run_session, to_proto
from detc.passes._graph_facts import constant_array, set_constant_input
from detc.passes.calibration import (
    ConvGeometry,
    calibration_feeds,
    collect,
    extract_patches,
    sample_positions,
    static_facts,
    with_extra_outputs,
)
from detc.passes.distill import DistillResult, DistillSettings, distill
from detc.passes.prune.groups import (
    ChannelGraph,
    ChannelGroup,
    ConvRole,
    analyze_channels,
    remove_units,
)
from detc.passes.prune.reconstruct import (
    DEFAULT_RIDGE,
    NormalEquations,
    choose_ridge,
    mean_shift_bias,
    patch_mask,
)

logger = logging.getLogger(__name__)

IMPORTANCE = ("auto", "l1", "l2", "bn", "data", "lsq")
SCOPES = ("layer", "global")
ALLOCATIONS = ("auto", "consumers", "outputs")

#: images the end-to-end output error is measured on (a diagnostic, not a gate)
_OUTPUT_ERROR_IMAGES = 4
#: every this-many-th calibration image is held back to choose each refit's ridge on
_HOLD_BACK_EVERY = 4


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
        16, "calibration images each trial cut of allocation=outputs is measured on"
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


# --- the pass ---------------------------------------------------------------------------------


class PrunePass(DetcPass):
    """Structured channel pruning: remove whole channels, refit consumers by least squares.

    A dependency analysis finds the channel groups that must be cut together: Conv ->
    BatchNorm -> activation -> Conv chains, residual Adds (coupled), Concat (offsets),
    Split/Slice on channels, depthwise Convs, and Resize/pooling/elementwise ops passed through.
    Channels that reach a graph output or an op the analysis does not know (a detection head's
    Reshape to its box/class layout) are never cut. Within a group channels go by importance;
    how many go per group follows ``ratio`` (or ``mac_reduction``), per layer or globally,
    rounded to ``multiple``. With ``calib`` images the global share is measured on the model's
    outputs (``allocation=outputs``), and the Convs reading pruned channels are refit by least
    squares (bias included) to reproduce their original outputs.
    """

    name = "prune"
    exact = False
    Options = PruneOptions
    #: the option ``detc sweep`` varies: the MAC share removed, comparable across passes
    sweep_option: ClassVar[str] = "mac_reduction"

    options: PruneOptions

    def __init__(self, options: PruneOptions | None = None) -> None:
        super().__init__(options)
        self.report: PruneReport | None = None

    def explain(self, model: ir.Model) -> list[Candidate]:
        cg = analyze_channels(model.graph)
        lines = []
        for group in cg.groups:
            reason = _why_not_prunable(group, self.options.multiple)
            for producer in group.producers:
                lines.append(
                    Candidate(node_label(producer), producer.op_type, reason is None, reason or "")
                )
        return lines

    def call(self, model: ir.Model) -> PassResult:
        started = time.perf_counter()
        opts = self.options
        cg = analyze_channels(model.graph)
        geometry, node_macs = static_facts(model)
        macs_before = sum(node_macs.values())
        candidates = [g for g in cg.groups if _why_not_prunable(g, opts.multiple) is None]
        mode = opts.importance
        if mode == "auto":
            mode = "lsq" if opts.calib is not None else "l2"
        report = PruneReport(str(opts), mode, macs_before, macs_before)
        self.report = report

        feeds: list[dict[str, np.ndarray]] = []
        stats: _Statistics | None = None
        original: onnx.ModelProto | None = None
        if opts.calib is not None and candidates:
            feeds = calibration_feeds(
                model, opts.calib, max_images=opts.calib_images, seed=opts.seed, spec_path=opts.spec
            )
            original = to_proto(model)
            report.calib_images = len(feeds)
            logger.info(
                "prune: statistics of %d candidate groups on %d calibration images",
                len(candidates),
                len(feeds),
            )
            stats = _Statistics.collect(original, cg, candidates, geometry, feeds, opts)

        cost = _MacModel(cg, node_macs, macs_before)
        rankings = {g.index: _rank(cg, g, mode, stats, opts) for g in candidates}
        probe = None
        allocation = opts.allocation
        if allocation == "auto":
            allocation = "outputs" if stats is not None else "consumers"
        if opts.scope == "global" and allocation == "outputs" and stats is not None:
            probe = _OutputProbe(model, cg, feeds[: opts.probe_images], opts.spec)
            report.probe_metric = probe.metric
            report.probe_images = min(opts.probe_images, len(feeds))
            logger.info(
                "prune: cutting each of %d groups alone at a few depths, on %d images",
                len(candidates),
                report.probe_images,
            )
        report.allocation = allocation if opts.scope == "global" else "uniform per layer"
        keep = _allocate(candidates, rankings, cost, stats, cg, opts, probe)
        if probe is not None:
            report.probes = probe.cuts
        removed = _removed_units(candidates, rankings, keep)
        report.groups = [
            GroupDecision(
                g.name, g.size, keep.get(g.index, g.size), _why_not_prunable(g, opts.multiple) or ""
            )
            for g in cg.groups
        ]
        if removed.size == 0:
            report.seconds = time.perf_counter() - started
            logger.info("%s", report.table())
            return PassResult(model, False)

        report.macs_after = cost.macs(removed)
        remove_units(model.graph, cg, removed)
        distills = opts.distill_steps > 0
        if (
            stats is not None
            and original is not None
            and (opts.recover or opts.mean_shift or distills)
        ):
            few = feeds[:_OUTPUT_ERROR_IMAGES]
            reference_session = ort_session(original)
            expected = [run_session(reference_session, feed) for feed in few]
            report.output_error_before = _output_error(expected, model, few)
            if opts.recover:
                report.recovery = "least squares" + (", sequential" if opts.sequential else "")
                report.fits = _recover(model, cg, removed, stats, feeds, opts)
            elif opts.mean_shift:
                report.recovery = "mean shift"
                _shift_means(model, cg, removed, stats)
            if distills:
                # the refit is the starting point: it is already close, training only polishes
                report.recovery = (
                    "distillation"
                    if report.recovery == "none"
                    else (report.recovery + " + distillation")
                )
                report.distill = _distill(model, original, feeds, opts)
            report.output_error_after = _output_error(expected, model, few)
        report.seconds = time.perf_counter() - started
        logger.info("%s", report.table())
        return PassResult(model, True)


def _terminal_progress(items: Sequence[Any], desc: str, unit: str) -> Iterator[Any]:
    """``items`` under a progress bar on a terminal (a minutes-long step must show it is alive);
    nothing in a log, where the stage's own log line says what runs."""
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit=unit, leave=False, disable=None)


def _why_not_prunable(group: ChannelGroup, multiple: int) -> str | None:
    if group.frozen:
        return f"{group.describe()} is kept: {group.frozen}"
    if group.size <= multiple:
        return f"{group.describe()} has no more than multiple={multiple} channels"
    return None


# --- importance: the order in which a group's units go ----------------------------------------


@dataclass(frozen=True)
class _Ranking:
    """A group's units in the order they are removed, and (lsq) the error after each removal."""

    order: np.ndarray  # positions into group.units, first to go first
    path_error: np.ndarray | None = None  # path_error[k]: summed relative error, k units gone


def _channel_norms(weight: np.ndarray, axis: int, order: int) -> np.ndarray:
    moved = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    return np.abs(moved).sum(axis=1) if order == 1 else np.sqrt((moved**2).sum(axis=1))


def _scatter(units: np.ndarray, channel_units: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum ``values`` (one per channel) into the position of each channel's unit in ``units``."""
    position = {int(u): i for i, u in enumerate(units.tolist())}
    out = np.zeros(len(units))
    for unit, value in zip(channel_units.tolist(), values.tolist(), strict=True):
        index = position.get(int(unit))
        if index is not None:
            out[index] += value
    return out


def _batchnorm_scale(producer: ir.Node) -> np.ndarray | None:
    users = list(producer.outputs[0].uses())
    if len(users) != 1 or users[0].node.op_type != "BatchNormalization":
        return None
    bn = users[0].node
    gamma = constant_array(bn.inputs[1])
    var = constant_array(bn.inputs[4]) if len(bn.inputs) > 4 else None
    if gamma is None or var is None:
        return None
    epsilon = bn.attributes.get_float("epsilon", 1e-5)
    return np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + epsilon)


def _scores(
    cg: ChannelGraph, group: ChannelGroup, mode: str, stats: _Statistics | None
) -> np.ndarray:
    """One importance score per unit of ``group`` for the norm and energy criteria."""
    roles = {id(r.node): r for r in cg.convs}
    scores = np.zeros(group.size)
    if mode == "data":
        assert stats is not None
        for consumer in group.consumers:
            layer = stats.layers.get(id(consumer))
            units = cg.units_of(consumer.inputs[0])
            if layer is None or units is None:
                continue
            column = _channel_norms(roles[id(consumer)].weight, 1, 2) ** 2
            scores += _scatter(group.units, units, layer.energy * column)
        return scores
    bn_scales = [_batchnorm_scale(p) for p in group.producers] if mode == "bn" else []
    # a folded model has no BatchNorm left: its filter norms already carry the BN scale
    use_bn = mode == "bn" and all(s is not None for s in bn_scales)
    for i, producer in enumerate(group.producers):
        units = cg.units_of(producer.outputs[0])
        assert units is not None
        bn_scale = bn_scales[i] if use_bn else None
        if bn_scale is not None:
            values = bn_scale
        else:
            values = _channel_norms(roles[id(producer)].weight, 0, 1 if mode == "l1" else 2)
        scores += _scatter(group.units, units, values)
    return scores


def _rank(
    cg: ChannelGraph,
    group: ChannelGroup,
    mode: str,
    stats: _Statistics | None,
    opts: PruneOptions,
) -> _Ranking:
    if mode == "lsq":
        assert stats is not None
        steps = group.size - _round_keep(
            math.ceil(group.size * (1 - opts.max_ratio)), group.size, opts.multiple
        )
        return _lsq_ranking(cg, group, stats, steps)
    return _Ranking(np.argsort(_scores(cg, group, mode, stats), kind="stable"))


@dataclass
class _Surgeon:
    """Optimal-brain-surgeon state of one consumer Conv: inverse Gram and compensated weights."""

    precision: np.ndarray  # inverse of the (ridged) Gram of [patch, 1], float64
    weight: np.ndarray  # (out, dim) compensated weights, each output divided by its spread
    blocks: dict[int, np.ndarray]  # unit -> its columns in the patch

    def costs(self, units: list[int]) -> np.ndarray:
        """Error added by removing each of ``units`` next (with the best refit)."""
        out = np.zeros(len(units))
        by_width: dict[int, list[int]] = {}
        for i, unit in enumerate(units):
            by_width.setdefault(len(self.blocks[unit]), []).append(i)
        for positions in by_width.values():
            cols = np.stack([self.blocks[units[i]] for i in positions])  # (U, b)
            block = self.precision[cols[:, :, None], cols[:, None, :]]  # (U, b, b)
            weights = self.weight[:, cols].transpose(1, 0, 2)  # (U, out, b)
            solved = np.linalg.solve(block, weights.transpose(0, 2, 1))  # (U, b, out)
            out[positions] = np.einsum("ubo,uob->u", solved, weights)
        return out / self.weight.shape[0]

    def remove(self, unit: int) -> None:
        cols = self.blocks.pop(unit)
        rows = self.precision[cols]  # (b, dim)
        inverse = np.linalg.inv(self.precision[np.ix_(cols, cols)])
        self.weight -= (self.weight[:, cols] @ inverse) @ rows
        self.precision -= rows.T @ inverse @ rows
        self.precision[cols] = 0.0
        self.precision[:, cols] = 0.0
        self.weight[:, cols] = 0.0


def _lsq_ranking(cg: ChannelGraph, group: ChannelGroup, stats: _Statistics, steps: int) -> _Ranking:
    """Greedy removal order: each step drops the unit whose loss the refit best absorbs."""
    position = {int(u): i for i, u in enumerate(group.units.tolist())}
    surgeons: list[_Surgeon] = []
    for consumer in group.consumers:
        layer = stats.layers.get(id(consumer))
        units = cg.units_of(consumer.inputs[0])
        if layer is None or units is None or layer.second_moment is None:
            continue
        taps = layer.taps
        blocks: dict[int, list[int]] = {}
        for channel, unit in enumerate(units.tolist()):
            if unit in position:
                blocks.setdefault(unit, []).extend(range(channel * taps, (channel + 1) * taps))
        moments = _one_shot(layer, np.ones(len(units), bool), None)
        surgeons.append(
            _Surgeon(
                precision=np.linalg.inv(moments.regularized_gram()),
                weight=layer.original / np.sqrt(moments.channel_scales())[:, None],
                blocks={u: np.asarray(c) for u, c in blocks.items()},
            )
        )
    alive = np.ones(group.size, bool)
    order: list[int] = []
    errors = [0.0]
    for _ in range(steps):
        costs = np.zeros(group.size)
        for surgeon in surgeons:
            units = list(surgeon.blocks)
            costs[[position[u] for u in units]] += surgeon.costs(units)
        costs[~alive] = np.inf
        best = int(np.argmin(costs))
        unit = int(group.units[best])
        for surgeon in surgeons:
            if unit in surgeon.blocks:
                surgeon.remove(unit)
        alive[best] = False
        order.append(best)
        errors.append(errors[-1] + max(float(costs[best]), 0.0))
    rest = [i for i in range(group.size) if alive[i]]
    return _Ranking(np.asarray(order + rest, dtype=np.int64), np.asarray(errors))


# --- MACs and allocation: how many units each group keeps -------------------------------------


class _MacModel:
    """Predicted MACs after removing units: every sliced Conv scales with its kept fractions."""

    def __init__(self, cg: ChannelGraph, node_macs: dict[ir.Node, int], total: int) -> None:
        self.total = total
        self.terms = []
        for role in cg.convs:
            macs = node_macs.get(role.node, 0)
            if not macs:
                continue
            out_units = cg.units_of(role.node.outputs[0])
            in_units = None if role.depthwise else cg.units_of(role.node.inputs[0])
            self.terms.append((macs, out_units, in_units))

    def macs(self, removed: np.ndarray) -> int:
        saved = 0.0
        for macs, out_units, in_units in self.terms:
            fraction = 1.0
            for units in (out_units, in_units):
                if units is not None:
                    fraction *= 1.0 - np.isin(units, removed).mean()
            saved += macs * (1.0 - fraction)
        return round(self.total - saved)


def _round_keep(keep: float, size: int, multiple: int) -> int:
    rounded = max(multiple, round(keep / multiple) * multiple)
    return min(rounded, size)


def _removed_units(
    groups: Sequence[ChannelGroup], rankings: dict[int, _Ranking], keep: dict[int, int]
) -> np.ndarray:
    parts = [g.units[rankings[g.index].order[: g.size - keep[g.index]]] for g in groups]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _allocate(
    groups: Sequence[ChannelGroup],
    rankings: dict[int, _Ranking],
    cost: _MacModel,
    stats: _Statistics | None,
    cg: ChannelGraph,
    opts: PruneOptions,
    probe: _OutputProbe | None = None,
) -> dict[int, int]:
    """How many units each candidate group keeps."""
    floor = {
        g.index: _round_keep(math.ceil(g.size * (1 - opts.max_ratio)), g.size, opts.multiple)
        for g in groups
    }

    def uniform(ratio: float) -> dict[int, int]:
        return {
            g.index: max(floor[g.index], _round_keep(g.size * (1 - ratio), g.size, opts.multiple))
            for g in groups
        }

    if opts.scope == "layer":
        if opts.mac_reduction is None:
            return uniform(opts.ratio)
        # the smallest uniform ratio whose rounded cut reaches the MAC goal
        goal = cost.total * (1 - opts.mac_reduction)
        low, high = 0.0, opts.max_ratio
        for _ in range(30):
            middle = (low + high) / 2
            if cost.macs(_removed_units(groups, rankings, uniform(middle))) <= goal:
                high = middle
            else:
                low = middle
        return uniform(high)
    if probe is not None and stats is not None:
        curves = {
            g.index: _measure_curve(
                g, rankings[g.index], floor[g.index], cg, stats, probe, cost, opts
            )
            for g in _terminal_progress(groups, "prune: trial cuts", "group")
        }
        return _greedy(groups, rankings, cost, floor, opts, lambda g, kept: curves[g.index](kept))
    cache: dict[tuple[int, int], float] = {}
    plain_scores = {g.index: _scores(cg, g, "l2", None) for g in groups if stats is None}

    def local(group: ChannelGroup, kept: int) -> float:
        key = (group.index, kept)
        if key not in cache:
            cache[key] = _local_hurt(group, kept, rankings, stats, cg, plain_scores)
        return cache[key]

    return _greedy(groups, rankings, cost, floor, opts, local)


def _local_hurt(
    group: ChannelGroup,
    kept: int,
    rankings: dict[int, _Ranking],
    stats: _Statistics | None,
    cg: ChannelGraph,
    plain_scores: dict[int, np.ndarray],
) -> float:
    """The damage of keeping ``kept`` units, measured at the group's consumers."""
    ranking = rankings[group.index]
    gone = group.size - kept
    if stats is not None and (ranking.path_error is None or stats.feeds_a_head(cg, group)):
        return stats.group_error(cg, group, group.units[ranking.order[:gone]])
    if ranking.path_error is not None:
        return float(ranking.path_error[gone])
    scores = plain_scores[group.index]
    mean = scores.mean()
    return float(scores[ranking.order[:gone]].sum() / mean) if mean > 0 else 0.0


def _greedy(
    groups: Sequence[ChannelGroup],
    rankings: dict[int, _Ranking],
    cost: _MacModel,
    floor: dict[int, int],
    opts: PruneOptions,
    hurt: Callable[[ChannelGroup, int], float],
) -> dict[int, int]:
    """Cut one `multiple` of channels at a time where it hurts least per MAC saved.

    ``hurt(group, kept)`` is the damage of keeping ``kept`` units of ``group``: measured on the
    model's outputs (allocation=outputs), else the consumers' summed relative reconstruction
    error after a least-squares refit when calibration statistics exist, else the importance of
    the channels cut relative to their group's mean.
    """
    keep = {g.index: g.size for g in groups}
    channel_goal = opts.ratio * sum(g.size for g in groups)
    mac_goal = None if opts.mac_reduction is None else cost.total * (1 - opts.mac_reduction)
    if mac_goal is None and channel_goal <= 0:
        return keep
    by_index = {g.index: g for g in groups}

    def next_step(group: ChannelGroup) -> tuple[float, int, int] | None:
        current = keep[group.index]
        target = _round_keep(current - opts.multiple, group.size, opts.multiple)
        if target >= current or target < floor[group.index]:
            return None
        order = rankings[group.index].order
        saved = cost.macs(group.units[order[: group.size - current]]) - cost.macs(
            group.units[order[: group.size - target]]
        )
        extra = hurt(group, target) - hurt(group, current)
        return (max(extra, 0.0) / max(saved, 1), group.index, target)

    heap = [step for g in groups if (step := next_step(g)) is not None]
    heapq.heapify(heap)
    removed_channels = 0
    while heap:
        _, index, target = heapq.heappop(heap)
        removed_channels += keep[index] - target
        keep[index] = target
        if mac_goal is not None:
            if cost.macs(_removed_units(groups, rankings, keep)) <= mac_goal:
                break
        elif removed_channels >= channel_goal:
            break
        step = next_step(by_index[index])
        if step is not None:
            heapq.heappush(heap, step)
    return keep


# --- allocation measured on the model's outputs ------------------------------------------------

#: how deep (fraction of its channels) allocation=outputs cuts each group, alone, to measure it
_PROBE_DEPTHS = (0.125, 0.25, 0.375, 0.5)
#: a reference detection from this score up is a pseudo ground truth of the agreement score
_CONFIDENT_SCORE = 0.25
_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


@dataclass(frozen=True)
class ProbeCut:
    """One trial of allocation=outputs: ``units`` of a group cut alone, and what it did."""

    name: str
    units: int
    macs_saved: int
    distortion: float


def _probe_cuts(group: ChannelGroup, floor: int, multiple: int) -> list[int]:
    """How many units each trial of ``group`` removes: its depths, in whole multiples."""
    cuts: list[int] = []
    for depth in _PROBE_DEPTHS:
        units = min(multiple * max(1, math.ceil(group.size * depth / multiple)), group.size - floor)
        if units > 0 and units not in cuts:
            cuts.append(units)
    return cuts


def _trial_weights(
    cg: ChannelGraph,
    group: ChannelGroup,
    removed: np.ndarray,
    stats: _Statistics,
    ridge: float,
) -> dict[ir.Node, tuple[np.ndarray, np.ndarray]]:
    """Weights of the Convs reading ``group`` once ``removed`` go, refit in one shot.

    The removed inputs keep zero columns instead of being sliced away: the same function as the
    pruned graph, so a trial is the original graph with a few weights swapped. The ridge is
    fixed: choosing it on held-back images, as the final refit does, measured no better
    allocation and costs a solve per strength and trial.
    """
    weights: dict[ir.Node, tuple[np.ndarray, np.ndarray]] = {}
    for consumer in group.consumers:
        layer = stats.layers.get(id(consumer))
        keep_in = cg.keep_mask(consumer.inputs[0], removed)
        if layer is None or keep_in is None or keep_in.all():
            continue
        columns = patch_mask(keep_in, layer.taps)
        theta = _one_shot(layer, keep_in, None).solve(ridge, prior=layer.original[:, columns].T)
        full = np.zeros_like(layer.original)
        full[:, columns] = theta.T
        dtype = layer.role.weight.dtype
        weights[consumer] = (
            full[:, :-1].reshape(layer.role.weight.shape).astype(dtype),
            full[:, -1].astype(dtype),
        )
    return weights


def _measure_curve(
    group: ChannelGroup,
    ranking: _Ranking,
    floor: int,
    cg: ChannelGraph,
    stats: _Statistics,
    probe: _OutputProbe,
    cost: _MacModel,
    opts: PruneOptions,
) -> Callable[[int], float]:
    """Distortion of the model's outputs against the number of units ``group`` keeps.

    Measured at a few depths, the group cut alone; linear in between. A deeper cut is never
    scored as less harmful than a shallower one (the envelope of the noisy measurements).
    """
    gone = [0]
    distortion = [0.0]
    for units in _probe_cuts(group, floor, opts.multiple):
        removed = group.units[ranking.order[:units]]
        measured = probe.distortion(_trial_weights(cg, group, removed, stats, _fixed_ridge(opts)))
        probe.cuts.append(ProbeCut(group.name, units, cost.total - cost.macs(removed), measured))
        gone.append(units)
        distortion.append(max(distortion[-1], measured))

    def curve(kept: int) -> float:
        cut = group.size - kept
        if cut <= gone[-1] or len(gone) < 2:
            return float(np.interp(cut, gone, distortion))
        slope = (distortion[-1] - distortion[-2]) / (gone[-1] - gone[-2])
        return distortion[-1] + slope * (cut - gone[-1])

    return curve


class _OutputProbe:
    """Runs the original graph with some Convs' weights swapped; scores its outputs.

    The score is the disagreement with the original model: with a decoder that reads the
    outputs (the model spec's), one minus the mAP@[.5:.95] of the trial's detections against the
    original's confident detections; else the relative squared error of the head Convs'
    outputs (per channel, averaged), or of the graph outputs when there is no head.
    """

    def __init__(
        self,
        model: ir.Model,
        cg: ChannelGraph,
        feeds: Sequence[dict[str, np.ndarray]],
        spec_path: Path | None,
    ) -> None:
        heads = [r.node.outputs[0] for r in cg.convs if _is_head(cg, r.node)]
        self._compared = [v.name for v in heads if v.name and not v.is_graph_output()]
        base = to_proto(model)
        self._base = with_extra_outputs(base, self._compared) if self._compared else base
        if not self._compared:
            self._compared = [o.name for o in self._base.graph.output]
        self._positions = {id(node): i for i, node in enumerate(model.graph)}
        self._feeds = list(feeds)
        session = ort_session(self._base)
        self._reference = [run_session(session, feed) for feed in self._feeds]
        self._spec = self._detection_spec(spec_path)
        self._truths: list[Detections] | None = None
        if self._spec is not None:
            self._truths = [d.above(_CONFIDENT_SCORE) for d in self._detections(self._reference)]
            if not any(len(d) for d in self._truths):
                self._truths = None
        self.metric = (
            "1 - mAP@[.5:.95] against the original's detections"
            if self._truths is not None
            else "relative squared error of the head Convs' outputs"
        )
        self.cuts: list[ProbeCut] = []

    def _detection_spec(self, spec_path: Path | None) -> ModelSpec | None:
        spec = load_spec(spec_path) if spec_path is not None else spec_from_onnx(self._base)
        try:  # a spec inferred for a model that is no detector: its outputs do not decode
            self._detections(self._reference[:1], spec)
        except (BadInputError, ValueError, IndexError, KeyError):
            return None
        return spec

    def _detections(
        self, outputs: Sequence[dict[str, np.ndarray]], spec: ModelSpec | None = None
    ) -> list[Detections]:
        chosen = spec or self._spec
        assert chosen is not None
        return [decode(chosen.decoder, o, chosen) for o in outputs]

    def distortion(self, weights: dict[ir.Node, tuple[np.ndarray, np.ndarray]]) -> float:
        proto = onnx.ModelProto()
        proto.CopyFrom(self._base)
        for number, (node, (weight, bias)) in enumerate(weights.items()):
            target = proto.graph.node[self._positions[id(node)]]
            names = (f"prune_probe_{number}_weight", f"prune_probe_{number}_bias")
            proto.graph.initializer.extend(
                [
                    onnx.numpy_helper.from_array(weight, names[0]),
                    onnx.numpy_helper.from_array(bias, names[1]),
                ]
            )
            inputs = [*target.input, "", ""][:3]
            inputs[1:3] = names
            del target.input[:]
            target.input.extend(inputs)
        session = ort_session(proto)
        outputs = [run_session(session, feed) for feed in self._feeds]
        if self._truths is not None:
            return 1.0 - _agreement(self._truths, self._detections(outputs))
        return _relative_error(self._reference, outputs, self._compared)


def _relative_error(
    reference: Sequence[dict[str, np.ndarray]],
    outputs: Sequence[dict[str, np.ndarray]],
    names: Sequence[str],
) -> float:
    """Squared error over variance, per channel (axis 1) of each tensor, averaged."""
    ratios = []
    for name in names:
        expected = np.concatenate([r[name] for r in reference]).astype(np.float64)
        actual = np.concatenate([o[name] for o in outputs]).astype(np.float64)
        if expected.ndim >= 2:
            expected = np.moveaxis(expected, 1, 0).reshape(expected.shape[1], -1)
            actual = np.moveaxis(actual, 1, 0).reshape(actual.shape[1], -1)
        else:
            expected, actual = expected.reshape(1, -1), actual.reshape(1, -1)
        error = ((actual - expected) ** 2).sum(axis=1)
        variance = ((expected - expected.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        ratios.append(error / (variance + 1e-3 * float(variance.mean()) + 1e-30))
    return float(np.concatenate(ratios).mean())


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), x1 y1 x2 y2."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    overlap = np.clip(bottom_right - top_left, 0.0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0.0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0.0, None).prod(axis=1)
    return overlap / np.maximum(area_a[:, None] + area_b[None, :] - overlap, 1e-12)


def _agreement(truths: Sequence[Detections], found: Sequence[Detections]) -> float:
    """COCO-style mAP@[.5:.95] of ``found`` with ``truths`` as ground truth (classes apart).

    Detections go by falling score; each takes the best-overlapping truth of its class not yet
    taken at that IoU threshold; precision is interpolated at 101 recall points.
    """
    classes = np.unique(np.concatenate([t.class_ids for t in truths]))
    recall_points = np.linspace(0.0, 1.0, 101)
    precisions = []
    for cls in classes.tolist():
        total = sum(int((t.class_ids == cls).sum()) for t in truths)
        scores: list[np.ndarray] = []
        hits: list[np.ndarray] = []
        for truth, candidate in zip(truths, found, strict=True):
            boxes = candidate.boxes[candidate.class_ids == cls]
            order = np.argsort(-candidate.scores[candidate.class_ids == cls], kind="stable")
            boxes = boxes[order]
            scores.append(candidate.scores[candidate.class_ids == cls][order])
            targets = truth.boxes[truth.class_ids == cls]
            matched = np.zeros((len(_IOU_THRESHOLDS), len(boxes)), bool)
            if len(boxes) and len(targets):
                iou = _box_iou(boxes, targets)
                for t, threshold in enumerate(_IOU_THRESHOLDS.tolist()):
                    taken = np.zeros(len(targets), bool)
                    for d in range(len(boxes)):
                        row = np.where(taken, -1.0, iou[d])
                        best = int(np.argmax(row))
                        if row[best] >= threshold:
                            taken[best] = True
                            matched[t, d] = True
            hits.append(matched)
        all_scores = np.concatenate(scores)
        order = np.argsort(-all_scores, kind="stable")
        all_hits = np.concatenate(hits, axis=1)[:, order]
        true_positives = np.cumsum(all_hits, axis=1)
        precision = true_positives / np.arange(1, all_hits.shape[1] + 1)
        recall = true_positives / total
        for t in range(len(_IOU_THRESHOLDS)):
            sampled = np.zeros(len(recall_points))
            if len(order):
                envelope = np.maximum.accumulate(precision[t][::-1])[::-1]
                index = np.searchsorted(recall[t], recall_points, side="left")
                valid = index < len(envelope)
                sampled[valid] = envelope[index[valid]]
            precisions.append(float(sampled.mean()))
    return float(np.mean(precisions)) if precisions else 1.0


# --- calibration statistics -------------------------------------------------------------------


@dataclass
class _LayerStats:
    role: ConvRole
    ordinal: int  # position among the graph's Convs: seeds its sampled pixels
    geometry: ConvGeometry
    original: np.ndarray  # [W | b] before pruning, (out_channels, C*kh*kw + 1), float64
    second_moment: np.ndarray | None  # sum of [patch, 1][patch, 1]^T (consumers of cut groups)
    energy_sum: np.ndarray  # per input channel, sum over pixels of x^2
    pixels: int = 0
    targets: list[np.ndarray] = field(default_factory=list)  # per image: (P, out) original y

    @property
    def energy(self) -> np.ndarray:
        return self.energy_sum / max(self.pixels, 1)

    @property
    def taps(self) -> int:
        return int(np.prod(self.role.weight.shape[2:]))


def _augmented_weight(role: ConvRole) -> np.ndarray:
    node = role.node
    weight = role.weight.astype(np.float64).reshape(role.weight.shape[0], -1)
    bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    bias64 = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    return np.hstack([weight, bias64[:, None]])


@dataclass
class _Statistics:
    """What one run of the original model on the calibration images tells the pass."""

    layers: dict[int, _LayerStats]  # by id() of the Conv node
    seed: int
    samples: int
    images: int = 0

    @property
    def holds_back(self) -> bool:
        """Whether there are enough images to hold some back for choosing the ridge."""
        return self.images >= _HOLD_BACK_EVERY

    def is_held_back(self, image: int) -> bool:
        return self.holds_back and image % _HOLD_BACK_EVERY == _HOLD_BACK_EVERY - 1

    @classmethod
    def collect(
        cls,
        original: onnx.ModelProto,
        cg: ChannelGraph,
        groups: Sequence[ChannelGroup],
        geometry: dict[ir.Node, ConvGeometry],
        feeds: Sequence[dict[str, np.ndarray]],
        opts: PruneOptions,
    ) -> _Statistics:
        consumers = {id(c) for g in groups for c in g.consumers}
        keep_targets = opts.recover and opts.sequential
        layers: dict[int, _LayerStats] = {}
        for ordinal, role in enumerate(cg.convs):
            node = role.node
            if role.depthwise or node not in geometry:
                continue
            is_consumer = id(node) in consumers
            if not (is_consumer or (keep_targets and opts.downstream)):
                continue
            dim = int(np.prod(role.weight.shape[1:])) + 1
            layers[id(node)] = _LayerStats(
                role,
                ordinal,
                geometry[node],
                _augmented_weight(role),
                np.zeros((dim, dim)) if is_consumer else None,
                np.zeros(role.weight.shape[1]),
            )
        stats = cls(layers, opts.seed, opts.samples, len(feeds))

        def visit(image: int, acts: dict[str, np.ndarray]) -> None:
            for layer in layers.values():
                x = acts[_input_name(layer.role.node)]
                patches = stats.augmented_patches(layer, x, image)
                if layer.second_moment is not None:
                    layer.second_moment += patches.T @ patches
                    layer.energy_sum += np.einsum("nchw,nchw->c", x, x, dtype=np.float64)
                    layer.pixels += x.shape[0] * x.shape[2] * x.shape[3]
                if keep_targets:
                    layer.targets.append((patches @ layer.original.T).astype(np.float32))

        names = [_input_name(layer.role.node) for layer in layers.values()]
        collect(original, names, feeds, visit)
        return stats

    def positions(self, layer: _LayerStats, image: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, layer.ordinal, image])
        return sample_positions(layer.geometry, self.samples, rng)

    def augmented_patches(self, layer: _LayerStats, x: np.ndarray, image: int) -> np.ndarray:
        patches = extract_patches(x, layer.geometry, self.positions(layer, image))
        return np.hstack([patches.astype(np.float64), np.ones((patches.shape[0], 1))])

    def feeds_a_head(self, cg: ChannelGraph, group: ChannelGroup) -> bool:
        return any(_is_head(cg, consumer) for consumer in group.consumers)

    def group_error(self, cg: ChannelGraph, group: ChannelGroup, removed: np.ndarray) -> float:
        """Summed relative error of the group's consumers after a one-shot refit.

        A head (a Conv whose outputs are the model's interface: box coordinates, scores)
        counts its *worst* output: a detector's few box logits vary far less than its many
        class logits, and a mean would hide that they are the ones a cut ruins.
        """
        total = 0.0
        for consumer in group.consumers:
            layer = self.layers.get(id(consumer))
            keep_in = cg.keep_mask(consumer.inputs[0], removed)
            if layer is None or keep_in is None or keep_in.all():
                continue
            moments = _one_shot(layer, keep_in, None)
            theta = moments.solve()
            if _is_head(cg, consumer):
                total += float((moments.channel_errors(theta) / moments.channel_scales()).max())
            else:
                total += moments.relative_error(theta)
        return total


def _is_head(cg: ChannelGraph, conv: ir.Node) -> bool:
    """A Conv whose output channels prune never cuts: they feed the graph's outputs or an op
    with a layout of its own (a detection head's Reshape to anchors x (box, score, classes))."""
    group = cg.group_of(conv)
    return group is not None and group.frozen is not None


def _input_name(node: ir.Node) -> str:
    value = node.inputs[0]
    assert value is not None and value.name
    return value.name


def _one_shot(
    layer: _LayerStats, keep_in: np.ndarray, keep_out: np.ndarray | None
) -> NormalEquations:
    """Regress a Conv's original output on the original inputs that survive."""
    assert layer.second_moment is not None
    weight = layer.original if keep_out is None else layer.original[keep_out]
    return NormalEquations.from_second_moment(
        layer.second_moment, patch_mask(keep_in, layer.taps), weight
    )


# --- recovery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Refit:
    layer: _LayerStats
    keep_in: np.ndarray
    keep_out: np.ndarray | None


def _recover(
    model: ir.Model,
    cg: ChannelGraph,
    removed: np.ndarray,
    stats: _Statistics,
    feeds: Sequence[dict[str, np.ndarray]],
    opts: PruneOptions,
) -> list[LayerFit]:
    """Refit the Convs that lost input channels (and, if asked, all downstream)."""
    cut: dict[int, _Refit] = {}
    for key, layer in stats.layers.items():
        node = layer.role.node
        keep_in = cg.keep_mask(node.inputs[0], removed)
        if keep_in is None or keep_in.all() or layer.second_moment is None:
            continue
        keep_out = cg.keep_mask(node.outputs[0], removed)
        cut[key] = _Refit(layer, keep_in, None if keep_out is None or keep_out.all() else keep_out)
    if not opts.sequential:
        return [
            _apply_fit(
                model.graph,
                refit,
                _one_shot(refit.layer, refit.keep_in, refit.keep_out),
                None,
                _fixed_ridge(opts),
            )
            for refit in cut.values()
        ]
    fits: list[LayerFit] = []
    levels = _refit_levels(model.graph, cg, removed, stats, cut, opts.downstream)
    logger.info(
        "prune: refitting %d Convs in %d levels (one calibration run per level)",
        sum(len(batch) for batch in levels),
        len(levels),
    )
    for batch in _terminal_progress(levels, "prune: refit", "level"):
        for refit, (fit, held) in zip(batch, _measure(model, batch, stats, feeds), strict=True):
            fits.append(_apply_fit(model.graph, refit, fit, held, opts.ridge))
    return fits


def _shift_means(
    model: ir.Model, cg: ChannelGraph, removed: np.ndarray, stats: _Statistics
) -> list[ir.Node]:
    """Without a refit: move the removed inputs' mean contribution into each consumer's bias.

    A pruned channel after SiLU or ReLU is far from zero on average; dropping it without this
    shifts every output of the Convs that read it. The weights stay the sliced originals.
    """
    shifted = []
    for layer in stats.layers.values():
        node = layer.role.node
        keep_in = cg.keep_mask(node.inputs[0], removed)
        if keep_in is None or keep_in.all() or layer.second_moment is None:
            continue
        bias = mean_shift_bias(layer.original, layer.second_moment, patch_mask(keep_in, layer.taps))
        keep_out = cg.keep_mask(node.outputs[0], removed)
        if keep_out is not None:
            bias = bias[keep_out]
        dtype = layer.role.weight.dtype
        set_constant_input(
            model.graph, node, 2, bias.astype(dtype), f"{node_label(node)}_bias_mean_shift"
        )
        shifted.append(node)
    return shifted


def _refit_levels(
    graph: ir.Graph,
    cg: ChannelGraph,
    removed: np.ndarray,
    stats: _Statistics,
    cut: dict[int, _Refit],
    downstream: bool,
) -> list[list[_Refit]]:
    """Every Conv to refit, by level: a level reads only Convs refit in earlier levels.

    The Convs that lost inputs, and (``downstream``) every plain Conv downstream of one: its
    input drifted.
    """
    level: dict[ir.Value, int] = {}
    drifted: set[ir.Value] = set()
    levels: dict[int, list[_Refit]] = {}
    for node in graph:
        depth = max((level.get(v, 0) for v in node.inputs if v is not None), default=0)
        dirty = any(v in drifted for v in node.inputs if v is not None)
        refit = cut.get(id(node))
        layer = stats.layers.get(id(node))
        if refit is None and dirty and downstream and layer is not None:
            keep_in = cg.keep_mask(node.inputs[0], removed)
            keep_out = cg.keep_mask(node.outputs[0], removed)
            refit = _Refit(
                layer,
                np.ones(layer.role.weight.shape[1], bool) if keep_in is None else keep_in,
                None if keep_out is None or keep_out.all() else keep_out,
            )
        if refit is not None:
            depth += 1
            levels.setdefault(depth, []).append(refit)
        for out in node.outputs:
            level[out] = depth
            if refit is not None or dirty:
                drifted.add(out)
    return [levels[k] for k in sorted(levels)]


def _measure(
    model: ir.Model,
    batch: Sequence[_Refit],
    stats: _Statistics,
    feeds: Sequence[dict[str, np.ndarray]],
) -> list[tuple[NormalEquations, NormalEquations | None]]:
    """Regress the original outputs on the *pruned* model's inputs to each Conv of ``batch``.

    Per Conv, the equations of the images the fit learns from and (with enough images) those of
    the held-back ones its ridge is chosen on.
    """
    found: list[tuple[NormalEquations, NormalEquations | None]] = []
    for refit in batch:
        outputs = refit.layer.original.shape[0]
        if refit.keep_out is not None:
            outputs = int(refit.keep_out.sum())
        dim = int(refit.keep_in.sum()) * refit.layer.taps + 1
        held = NormalEquations.zeros(dim, outputs) if stats.holds_back else None
        found.append((NormalEquations.zeros(dim, outputs), held))

    def visit(image: int, acts: dict[str, np.ndarray]) -> None:
        for refit, (fit, held) in zip(batch, found, strict=True):
            layer = refit.layer
            patches = stats.augmented_patches(layer, acts[_input_name(layer.role.node)], image)
            target = layer.targets[image].astype(np.float64)
            if refit.keep_out is not None:
                target = target[:, refit.keep_out]
            (held if held is not None and stats.is_held_back(image) else fit).add(patches, target)

    collect(model, [_input_name(r.layer.role.node) for r in batch], feeds, visit)
    return found


def _fixed_ridge(opts: PruneOptions) -> float:
    """The ridge of refits that have no held-back images to choose one on."""
    return DEFAULT_RIDGE if opts.ridge is None else opts.ridge


def _apply_fit(
    graph: ir.Graph,
    refit: _Refit,
    fit: NormalEquations,
    held: NormalEquations | None,
    ridge: float | None,
) -> LayerFit:
    """Solve, write the refit weight and bias into the (already sliced) Conv, report errors.

    The ridge pulls towards the sliced original weights: what the Conv computed before is the
    best guess wherever the calibration images say little. Unset, it is the strength whose fit
    on ``fit`` errs least on ``held``; the final solve then uses both.
    """
    layer = refit.layer
    node = layer.role.node
    weight = layer.role.weight
    sliced = layer.original if refit.keep_out is None else layer.original[refit.keep_out]
    prior = sliced[:, patch_mask(refit.keep_in, layer.taps)].T
    if ridge is None and held is not None and held.count > 0 and fit.count > 0:
        chosen, _ = choose_ridge(fit, held, prior)
    else:
        chosen = DEFAULT_RIDGE if ridge is None else ridge
    moments = fit if held is None else fit.merged(held)
    theta = moments.solve(chosen, prior=prior)
    before = moments.relative_error(prior)
    after = moments.relative_error(theta)
    if after > before:  # too few samples for the ridge to help: keep the sliced weights
        theta, chosen = moments.solve_bias(prior), math.inf
        after = moments.relative_error(theta)
    new_weight = theta[:-1].T.reshape(theta.shape[1], int(refit.keep_in.sum()), *weight.shape[2:])
    label = node_label(node)
    set_constant_input(graph, node, 1, new_weight.astype(weight.dtype), f"{label}_weight_refit")
    set_constant_input(graph, node, 2, theta[-1].astype(weight.dtype), f"{label}_bias_refit")
    return LayerFit(label, float(before), float(after), chosen)


def _distill(
    model: ir.Model,
    original: onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    opts: PruneOptions,
) -> DistillResult:
    """Train the pruned model against the original on the calibration images (in place)."""
    name = next(iter(feeds[0]))
    settings = DistillSettings(
        steps=opts.distill_steps,
        size=opts.distill_size,
        batch=opts.distill_batch,
        lr=opts.distill_lr,
        features=opts.distill_features,
        seed=opts.seed,
    )
    teacher = ir.serde.deserialize_model(original)
    return distill(model, teacher, [feed[name] for feed in feeds], settings, name)


def _output_error(
    expected: Sequence[dict[str, np.ndarray]],
    model: ir.Model,
    feeds: Sequence[dict[str, np.ndarray]],
) -> float:
    """Relative squared error of ``model``'s graph outputs on ``feeds`` against ``expected``
    (the original model's outputs on them, computed once for the before and after figures)."""
    candidate = ort_session(to_proto(model))
    error = energy = 0.0
    for feed, outputs in zip(feeds, expected, strict=True):
        actual = run_session(candidate, feed)
        for name, value in outputs.items():
            ref = value.astype(np.float64)
            error += float(((actual[name].astype(np.float64) - ref) ** 2).sum())
            energy += float(((ref - ref.mean()) ** 2).sum())
    return error / max(energy, 1e-30)
