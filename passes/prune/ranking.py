"""Importance: the order in which a channel group's units go (norms, BatchNorm scales,
activation energy, or the least-squares greedy removal of ``lsq``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from detc.passes._graph_facts import constant_array
from detc.passes.prune.groups import ChannelGraph, ChannelGroup
from detc.passes.prune.options import PruneOptions
from detc.passes.prune.statistics import Statistics, one_shot


@dataclass(frozen=True)
class Ranking:
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


def importance_scores(
    cg: ChannelGraph, group: ChannelGroup, mode: str, stats: Statistics | None
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


def rank(
    cg: ChannelGraph,
    group: ChannelGroup,
    mode: str,
    stats: Statistics | None,
    opts: PruneOptions,
) -> Ranking:
    if mode == "lsq":
        assert stats is not None
        steps = group.size - round_keep(
            math.ceil(group.size * (1 - opts.max_ratio)), group.size, opts.multiple
        )
        return _lsq_ranking(cg, group, stats, steps)
    return Ranking(np.argsort(importance_scores(cg, group, mode, stats), kind="stable"))


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


def _lsq_ranking(cg: ChannelGraph, group: ChannelGroup, stats: Statistics, steps: int) -> Ranking:
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
        moments = one_shot(layer, np.ones(len(units), bool), None)
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
    return Ranking(np.asarray(order + rest, dtype=np.int64), np.asarray(errors))


def round_keep(keep: float, size: int, multiple: int) -> int:
    rounded = max(multiple, round(keep / multiple) * multiple)
    return min(rounded, size)
