"""prune: structured channel pruning that really removes channels, then refits what reads them.

Three steps, each in its own module of this package; this one is the pass that runs them:

1. **Groups** (:mod:`.groups`): which channels must go together.
2. **Choice**: which channels of a group go first (importance, :mod:`.ranking`, from the
   calibration :mod:`.statistics`) and how many per group (:mod:`.allocation`: a uniform ratio
   per layer, or a global competition).
3. **Recovery** (:mod:`.recovery`): with calibration images, every Conv that lost input channels
   is refit by least squares so that it reproduces its *original* output:
   ``min ||W x + b - (W' x' + b')||^2`` over sampled output pixels, with ``x'`` the surviving
   im2col patch and a constant column for the bias (:mod:`.reconstruct`). ``sequential`` does it
   level by level on the pruned model's own activations, so each refit also absorbs the drift of
   the cuts before it. A few dozen images do not pin down a Conv with a thousand inputs: each
   refit's ridge (towards the sliced original weights) is the one whose fit on three quarters of
   the images errs least on the rest.
   Without a refit, ``mean_shift`` still moves the cut channels' mean into the biases.

The ``lsq`` importance ranks channels the way recovery will judge them: it removes, one at a
time, the channel whose loss the others can best make up for (the least-squares error after an
optimal refit grows least), updating the inverse Gram matrix as it goes — the structured form of
Optimal Brain Surgeon on a layer-wise reconstruction objective.

How much each group loses is the real question on a compact detector: a cut that its consumers
reconstruct well can still ruin the boxes three layers later. ``allocation=outputs`` therefore
measures it (:mod:`.probe`): each group is cut alone at a few depths (consumers refit in one
shot) and the model's outputs on calibration images are compared with the original's — as
detections when the model spec's decoder reads them. The global competition then spends the MAC
budget where the measured damage per MAC saved is least. Options and report: :mod:`.options`.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.ir.pass_base import Candidate, DetcPass, PassResult, node_label
from detc.compiler.reference import ort_session, run_session, to_proto
from detc.passes.calibration import calibration_feeds, static_facts
from detc.passes.prune.allocation import MacModel, allocate, removed_units
from detc.passes.prune.groups import ChannelGroup, analyze_channels, remove_units
from detc.passes.prune.options import GroupDecision, PruneOptions, PruneReport
from detc.passes.prune.probe import OutputProbe
from detc.passes.prune.ranking import rank
from detc.passes.prune.recovery import distill_pruned, output_error, recover, shift_means
from detc.passes.prune.statistics import Statistics

logger = logging.getLogger(__name__)

#: images the end-to-end output error is measured on (a diagnostic, not a gate)
_OUTPUT_ERROR_IMAGES = 4


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
    calibration_option = "calib"
    #: the MAC share removed: comparable across passes
    sweep_option = "mac_reduction"

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
        stats: Statistics | None = None
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
            stats = Statistics.collect(original, cg, candidates, geometry, feeds, opts)

        cost = MacModel(cg, node_macs, macs_before)
        rankings = {g.index: rank(cg, g, mode, stats, opts) for g in candidates}
        probe = None
        allocation = opts.allocation
        if allocation == "auto":
            allocation = "outputs" if stats is not None else "consumers"
        if opts.scope == "global" and allocation == "outputs" and stats is not None:
            metric = "detections" if opts.probe_metric == "auto" else opts.probe_metric
            probe = OutputProbe(model, cg, feeds[: opts.probe_images], opts.spec, metric)
            report.probe_metric = probe.metric
            report.probe_images = min(opts.probe_images, len(feeds))
            logger.info(
                "prune: cutting each of %d groups alone at a few depths, on %d images",
                len(candidates),
                report.probe_images,
            )
        report.allocation = allocation if opts.scope == "global" else "uniform per layer"
        keep = allocate(candidates, rankings, cost, stats, cg, opts, probe)
        if probe is not None:
            report.probes = probe.cuts
        removed = removed_units(candidates, rankings, keep)
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
            report.output_error_before = output_error(expected, model, few)
            if opts.recover:
                report.recovery = "least squares" + (", sequential" if opts.sequential else "")
                report.fits = recover(model, cg, removed, stats, feeds, opts)
            elif opts.mean_shift:
                report.recovery = "mean shift"
                shift_means(model, cg, removed, stats)
            if distills:
                # the refit is the starting point: it is already close, training only polishes
                report.recovery = (
                    "distillation"
                    if report.recovery == "none"
                    else (report.recovery + " + distillation")
                )
                report.distill = distill_pruned(model, original, feeds, opts)
            report.output_error_after = output_error(expected, model, few)
        report.seconds = time.perf_counter() - started
        logger.info("%s", report.table())
        return PassResult(model, True)


def _why_not_prunable(group: ChannelGroup, multiple: int) -> str | None:
    if group.frozen:
        return f"{group.describe()} is kept: {group.frozen}"
    if group.size <= multiple:
        return f"{group.describe()} has no more than multiple={multiple} channels"
    return None
