"""Recovery: refit the Convs that lost input channels by least squares (sequentially, level by
level, or in one shot), shift means into biases, distill; and measure the output error."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.ir.pass_base import node_label
from detc.compiler.progress import progress
from detc.compiler.reference import ort_session, run_session, to_proto
from detc.passes._graph_facts import set_constant_input
from detc.passes.calibration import collect
from detc.passes.distill import DistillResult, DistillSettings, distill
from detc.passes.prune.groups import ChannelGraph
from detc.passes.prune.options import LayerFit, PruneOptions, fixed_ridge
from detc.passes.prune.reconstruct import (
    DEFAULT_RIDGE,
    NormalEquations,
    choose_ridge,
    mean_shift_bias,
    patch_mask,
)
from detc.passes.prune.statistics import LayerStats, Statistics, input_name, one_shot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Refit:
    layer: LayerStats
    keep_in: np.ndarray
    keep_out: np.ndarray | None


def recover(
    model: ir.Model,
    cg: ChannelGraph,
    removed: np.ndarray,
    stats: Statistics,
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
                one_shot(refit.layer, refit.keep_in, refit.keep_out),
                None,
                fixed_ridge(opts),
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
    for batch in progress(levels, "prune: refit", "level"):
        for refit, (fit, held) in zip(batch, _measure(model, batch, stats, feeds), strict=True):
            fits.append(_apply_fit(model.graph, refit, fit, held, opts.ridge))
    return fits


def shift_means(
    model: ir.Model, cg: ChannelGraph, removed: np.ndarray, stats: Statistics
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
    stats: Statistics,
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
    stats: Statistics,
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
            patches = stats.augmented_patches(layer, acts[input_name(layer.role.node)], image)
            target = layer.targets[image].astype(np.float64)
            if refit.keep_out is not None:
                target = target[:, refit.keep_out]
            (held if held is not None and stats.is_held_back(image) else fit).add(patches, target)

    collect(model, [input_name(r.layer.role.node) for r in batch], feeds, visit)
    return found


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


def distill_pruned(
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


def output_error(
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
