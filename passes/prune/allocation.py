"""Allocation: how many units each channel group keeps (a uniform ratio per layer, or a global
competition for the MAC budget where the measured damage per MAC saved is least)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from detc.compiler.progress import progress
from detc.passes.prune.groups import ChannelGraph, ChannelGroup
from detc.passes.prune.options import ProbeCut, PruneOptions, fixed_ridge
from detc.passes.prune.probe import OutputProbe, probe_cuts, trial_weights
from detc.passes.prune.ranking import Ranking, importance_scores, round_keep
from detc.passes.prune.statistics import Statistics


class MacModel:
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


def removed_units(
    groups: Sequence[ChannelGroup], rankings: dict[int, Ranking], keep: dict[int, int]
) -> np.ndarray:
    parts = [g.units[rankings[g.index].order[: g.size - keep[g.index]]] for g in groups]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def allocate(
    groups: Sequence[ChannelGroup],
    rankings: dict[int, Ranking],
    cost: MacModel,
    stats: Statistics | None,
    cg: ChannelGraph,
    opts: PruneOptions,
    probe: OutputProbe | None = None,
) -> dict[int, int]:
    """How many units each candidate group keeps."""
    floor = {g.index: fewest_kept(g.size, opts.max_ratio, opts.multiple) for g in groups}

    def uniform(ratio: float) -> dict[int, int]:
        return {
            g.index: max(floor[g.index], round_keep(g.size * (1 - ratio), g.size, opts.multiple))
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
            if cost.macs(removed_units(groups, rankings, uniform(middle))) <= goal:
                high = middle
            else:
                low = middle
        return uniform(high)
    if probe is not None and stats is not None:
        curves = {
            g.index: measure_curve(
                g, rankings[g.index], floor[g.index], cg, stats, probe, cost, opts
            )
            for g in progress(groups, "prune: trial cuts", "group")
        }
        return _greedy(groups, rankings, cost, floor, opts, lambda g, kept: curves[g.index](kept))
    cache: dict[tuple[int, int], float] = {}
    plain_scores = {g.index: importance_scores(cg, g, "l2", None) for g in groups if stats is None}

    def local(group: ChannelGroup, kept: int) -> float:
        key = (group.index, kept)
        if key not in cache:
            cache[key] = _local_hurt(group, kept, rankings, stats, cg, plain_scores)
        return cache[key]

    return _greedy(groups, rankings, cost, floor, opts, local)


def fewest_kept(size: int, max_ratio: float, multiple: int) -> int:
    """The fewest units a group of ``size`` may keep: a whole multiple, rounded *up*, so that
    it never loses more than ``max_ratio`` (rounded to the nearest, a 32-channel group with
    max_ratio=0.3 and multiple=16 would lose half)."""
    least = math.ceil(size * (1 - max_ratio) - 1e-9)
    return min(size, max(multiple, multiple * math.ceil(least / multiple)))


def _local_hurt(
    group: ChannelGroup,
    kept: int,
    rankings: dict[int, Ranking],
    stats: Statistics | None,
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
    rankings: dict[int, Ranking],
    cost: MacModel,
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
        target = round_keep(current - opts.multiple, group.size, opts.multiple)
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
            if cost.macs(removed_units(groups, rankings, keep)) <= mac_goal:
                break
        elif removed_channels >= channel_goal:
            break
        step = next_step(by_index[index])
        if step is not None:
            heapq.heappush(heap, step)
    return keep


def measure_curve(
    group: ChannelGroup,
    ranking: Ranking,
    floor: int,
    cg: ChannelGraph,
    stats: Statistics,
    probe: OutputProbe,
    cost: MacModel,
    opts: PruneOptions,
) -> Callable[[int], float]:
    """Distortion of the model's outputs against the number of units ``group`` keeps.

    Measured at a few depths, the group cut alone; linear in between. A deeper cut is never
    scored as less harmful than a shallower one (the envelope of the noisy measurements).
    """
    gone = [0]
    distortion = [0.0]
    for units in probe_cuts(group, floor, opts.multiple):
        removed = group.units[ranking.order[:units]]
        measured = probe.distortion(trial_weights(cg, group, removed, stats, fixed_ridge(opts)))
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
