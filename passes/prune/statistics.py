"""What one run of the original model on the calibration images tells prune: per consumer
Conv, the second moment of its sampled input patches, its inputs' energy and (sequential
refit) its original outputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from detc.passes._graph_facts import constant_array
from detc.passes.calibration import ConvGeometry, collect, extract_patches, sample_positions
from detc.passes.prune.groups import ChannelGraph, ChannelGroup, ConvRole
from detc.passes.prune.options import PruneOptions
from detc.passes.prune.reconstruct import NormalEquations, patch_mask

#: every this-many-th calibration image is held back to choose each refit's ridge on
_HOLD_BACK_EVERY = 4


@dataclass
class LayerStats:
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
class Statistics:
    """What one run of the original model on the calibration images tells the pass."""

    layers: dict[int, LayerStats]  # by id() of the Conv node
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
    ) -> Statistics:
        consumers = {id(c) for g in groups for c in g.consumers}
        keep_targets = opts.recover and opts.sequential
        layers: dict[int, LayerStats] = {}
        for ordinal, role in enumerate(cg.convs):
            node = role.node
            if role.depthwise or node not in geometry:
                continue
            is_consumer = id(node) in consumers
            if not (is_consumer or (keep_targets and opts.downstream)):
                continue
            dim = int(np.prod(role.weight.shape[1:])) + 1
            layers[id(node)] = LayerStats(
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
                x = acts[input_name(layer.role.node)]
                patches = stats.augmented_patches(layer, x, image)
                if layer.second_moment is not None:
                    layer.second_moment += patches.T @ patches
                    layer.energy_sum += np.einsum("nchw,nchw->c", x, x, dtype=np.float64)
                    layer.pixels += x.shape[0] * x.shape[2] * x.shape[3]
                if keep_targets:
                    layer.targets.append((patches @ layer.original.T).astype(np.float32))

        names = [input_name(layer.role.node) for layer in layers.values()]
        collect(original, names, feeds, visit)
        return stats

    def positions(self, layer: LayerStats, image: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, layer.ordinal, image])
        return sample_positions(layer.geometry, self.samples, rng)

    def augmented_patches(self, layer: LayerStats, x: np.ndarray, image: int) -> np.ndarray:
        patches = extract_patches(x, layer.geometry, self.positions(layer, image))
        return np.hstack([patches.astype(np.float64), np.ones((patches.shape[0], 1))])

    def feeds_a_head(self, cg: ChannelGraph, group: ChannelGroup) -> bool:
        return any(is_head(cg, consumer) for consumer in group.consumers)

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
            moments = one_shot(layer, keep_in, None)
            theta = moments.solve()
            if is_head(cg, consumer):
                total += float((moments.channel_errors(theta) / moments.channel_scales()).max())
            else:
                total += moments.relative_error(theta)
        return total


def is_head(cg: ChannelGraph, conv: ir.Node) -> bool:
    """A Conv whose output channels prune never cuts: they feed the graph's outputs or an op
    with a layout of its own (a detection head's Reshape to anchors x (box, score, classes))."""
    group = cg.group_of(conv)
    return group is not None and group.frozen is not None


def input_name(node: ir.Node) -> str:
    value = node.inputs[0]
    assert value is not None and value.name
    return value.name


def one_shot(
    layer: LayerStats, keep_in: np.ndarray, keep_out: np.ndarray | None
) -> NormalEquations:
    """Regress a Conv's original output on the original inputs that survive."""
    assert layer.second_moment is not None
    weight = layer.original if keep_out is None else layer.original[keep_out]
    return NormalEquations.from_second_moment(
        layer.second_moment, patch_mask(keep_in, layer.taps), weight
    )
