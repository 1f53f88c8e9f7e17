"""Which channels must be pruned together: dependency analysis of an ONNX graph's channel axis.

Every channel a Conv produces, and every channel of a graph input, gets an integer id. Ids travel
with the tensors that carry them on axis 1 (NCHW): pass-through ops (activations, BatchNorm,
pooling, Resize) keep them, Concat on channels concatenates them (so offsets come for free),
Split/Slice on channels cut them, a depthwise Conv keeps them. An elementwise op on two channel
tensors (a residual Add, ``x * sigmoid(x)``) *couples* the ids position by position: a union-find
merges them into one **unit**, the atom of pruning. Removing a unit removes that channel from
every tensor, weight and per-channel constant it appears in. The units that the same Convs
produce form a **group**: what a pruning ratio, an importance ranking and rounding apply to.

Whatever the analysis does not understand (an op it does not know, a channel tensor reaching a
graph output, a grouped Conv, a runtime weight) *freezes* the units it touches, and a group with
a frozen unit is left whole, with the reason kept for ``detc explain prune``. Guessing would
silently break the model; stopping costs only a missed opportunity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from detc.compiler.ir.pass_base import node_label
from detc.passes._graph_facts import (
    ONNX_DOMAINS,
    constant_array,
    describe_node,
    set_constant_input,
)

#: one input, one output, channel axis untouched (extra inputs, if any, are scalars)
_PASS_THROUGH = frozenset(
    {
        "Abs",
        "AveragePool",
        "Cast",
        "Celu",
        "Clip",
        "Elu",
        "Erf",
        "Exp",
        "Gelu",
        "GlobalAveragePool",
        "GlobalLpPool",
        "GlobalMaxPool",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "LeakyRelu",
        "Log",
        "LpPool",
        "Mish",
        "Neg",
        "Reciprocal",
        "Relu",
        "Selu",
        "Sigmoid",
        "Softplus",
        "Softsign",
        "Sqrt",
        "Tanh",
        "ThresholdedRelu",
    }
)
#: these have a second output that depends on the channel layout; it must be unused
_PASS_THROUGH_FIRST_OUTPUT = frozenset({"MaxPool", "Dropout"})
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"})


@dataclass
class _Tracked:
    ids: np.ndarray  # int64 channel ids along axis 1
    rank: int


@dataclass(frozen=True)
class ConvRole:
    """A Conv whose constant weight prune may slice: on axis 0 (outputs) and/or 1 (inputs)."""

    node: ir.Node
    weight: np.ndarray
    depthwise: bool  # group == channels: its output carries its input's channels


@dataclass(frozen=True)
class _ParamSlice:
    """A constant input sliced along ``axis`` by the channel mask of ``carrier``."""

    node: ir.Node
    input_index: int
    axis: int
    carrier: ir.Value


@dataclass(frozen=True)
class _SplitOnChannels:
    node: ir.Node


@dataclass(frozen=True)
class _SliceOnChannels:
    node: ir.Node
    position: int  # where the channel axis sits in the Slice's axes list
    channels: int  # input channel count before pruning


@dataclass
class ChannelGroup:
    """Channels produced by coupled Convs; pruned together, unit by unit."""

    index: int
    units: np.ndarray  # unit ids, in the order the first producer makes them
    producers: tuple[ir.Node, ...]
    consumers: tuple[ir.Node, ...]  # plain Convs (group=1) that read the group's channels
    frozen: str | None = None

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def name(self) -> str:
        return node_label(self.producers[0])

    def describe(self) -> str:
        names = ", ".join(f"'{node_label(p)}'" for p in self.producers[:3])
        more = f" and {len(self.producers) - 3} more" if len(self.producers) > 3 else ""
        return f"group {self.index} ({self.size} channels of Conv {names}{more})"


@dataclass
class ChannelGraph:
    """The result of :func:`analyze_channels`: ids per tensor, units, groups, what to edit."""

    tracked: dict[ir.Value, _Tracked] = field(default_factory=dict)
    convs: list[ConvRole] = field(default_factory=list)
    groups: list[ChannelGroup] = field(default_factory=list)
    _parent: list[int] = field(default_factory=list)
    _creator: list[int] = field(default_factory=list)
    _creators: list[ir.Node | None] = field(default_factory=list)
    _frozen: dict[int, str] = field(default_factory=dict)
    _param_slices: list[_ParamSlice] = field(default_factory=list)
    _splits: list[_SplitOnChannels] = field(default_factory=list)
    _slices: list[_SliceOnChannels] = field(default_factory=list)

    # --- union-find ------------------------------------------------------------------------

    def _fresh(self, count: int, creator: ir.Node | None, frozen: str | None = None) -> np.ndarray:
        start = len(self._parent)
        ids = np.arange(start, start + count, dtype=np.int64)
        self._parent.extend(ids.tolist())
        self._creator.extend([len(self._creators)] * count)
        self._creators.append(creator)
        if frozen:
            for i in ids.tolist():
                self._frozen.setdefault(i, frozen)
        return ids

    def _find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def _union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def _freeze(self, ids: np.ndarray, reason: str) -> None:
        for i in ids.tolist():
            self._frozen.setdefault(i, reason)

    # --- queries -----------------------------------------------------------------------------

    def units_of(self, value: ir.Value | None) -> np.ndarray | None:
        """The unit of each channel of ``value`` (axis 1), or None if it carries no tracked ids."""
        if value is None or value not in self.tracked:
            return None
        return np.array([self._find(i) for i in self.tracked[value].ids.tolist()], dtype=np.int64)

    def keep_mask(self, value: ir.Value | None, removed: np.ndarray) -> np.ndarray | None:
        """Which channels of ``value`` survive when the units ``removed`` go."""
        units = self.units_of(value)
        return None if units is None else ~np.isin(units, removed)

    def group_of(self, node: ir.Node) -> ChannelGroup | None:
        """The group a producer Conv belongs to."""
        for group in self.groups:
            if any(p is node for p in group.producers):
                return group
        return None


def analyze_channels(graph: ir.Graph) -> ChannelGraph:
    """Trace channel ids through ``graph`` (topologically ordered, as ONNX requires)."""
    cg = ChannelGraph()
    for value in graph.inputs:
        shape = value.shape
        if shape is not None and len(shape) >= 2 and isinstance(shape[1], int):
            reason = f"channels of graph input '{value.name}' are fixed by the model's interface"
            ids = cg._fresh(int(shape[1]), None, frozen=reason)
            cg.tracked[value] = _Tracked(ids, len(shape))
    for node in graph:
        _visit(cg, node)
    for value in graph.outputs:
        if value in cg.tracked:
            cg._freeze(cg.tracked[value].ids, f"its channels reach graph output '{value.name}'")
    _build_groups(cg)
    return cg


# --- the walk --------------------------------------------------------------------------------


def _visit(cg: ChannelGraph, node: ir.Node) -> None:
    tracked_inputs = [
        (i, v) for i, v in enumerate(node.inputs) if v is not None and v in cg.tracked
    ]
    op = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"
    if op == "Conv":
        _visit_conv(cg, node)
        return
    if not tracked_inputs:
        return
    if op in _PASS_THROUGH:
        if tracked_inputs[0][0] != 0:
            _freeze_inputs(
                cg, node, f"reads channels through a side input of {describe_node(node)}"
            )
            return
        _forward(cg, node, 0)
        return
    if op in _PASS_THROUGH_FIRST_OUTPUT:
        extra = [v for v in node.outputs[1:] if v is not None and (v.uses() or v.is_graph_output())]
        if extra or tracked_inputs[0][0] != 0:
            _freeze_inputs(cg, node, f"{describe_node(node)} also returns a per-channel output")
            return
        _forward(cg, node, 0)
        return
    handler = _HANDLERS.get(op)
    if handler is None:
        _freeze_inputs(cg, node, f"feeds {describe_node(node)}, whose channel layout is unknown")
        return
    handler(cg, node)


def _forward(cg: ChannelGraph, node: ir.Node, index: int) -> None:
    source = cg.tracked[node.inputs[index]]  # type: ignore[index]
    cg.tracked[node.outputs[0]] = _Tracked(source.ids, source.rank)


def _freeze_inputs(cg: ChannelGraph, node: ir.Node, reason: str) -> None:
    for value in node.inputs:
        if value is not None and value in cg.tracked:
            cg._freeze(cg.tracked[value].ids, reason)


def _visit_conv(cg: ChannelGraph, node: ir.Node) -> None:
    label = describe_node(node)
    source = cg.tracked.get(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if (
        weight is None
        or weight.dtype.kind != "f"
        or weight.ndim < 3
        or (bias_value is not None and constant_array(bias_value) is None)
    ):
        if source is not None:
            cg._freeze(source.ids, f"feeds {label}, whose weight or bias is not a constant")
        return
    groups = node.attributes.get_int("group", 1)
    out_channels = int(weight.shape[0])
    rank = weight.ndim
    if source is not None and len(source.ids) != weight.shape[1] * groups:
        cg._freeze(source.ids, f"{label} weight does not match its input's channel count")
        source = None
    if groups == 1:
        cg.convs.append(ConvRole(node, weight, depthwise=False))
        cg.tracked[node.outputs[0]] = _Tracked(cg._fresh(out_channels, node), rank)
        return
    if weight.shape[1] == 1 and out_channels == groups and source is not None:
        cg.convs.append(ConvRole(node, weight, depthwise=True))
        cg.tracked[node.outputs[0]] = _Tracked(source.ids, rank)
        return
    reason = f"{label} is a grouped Conv (group={groups}): its channel counts are kept"
    if source is not None:
        cg._freeze(source.ids, reason)
    cg.tracked[node.outputs[0]] = _Tracked(cg._fresh(out_channels, node, frozen=reason), rank)


def _elementwise(cg: ChannelGraph, node: ir.Node) -> None:
    label = describe_node(node)
    tracked = [(i, cg.tracked[v]) for i, v in enumerate(node.inputs) if v in cg.tracked]
    ranks = {t.rank for _, t in tracked}
    if len(ranks) != 1:
        _freeze_inputs(cg, node, f"{label} mixes tensors of different ranks")
        return
    rank = ranks.pop()
    channels = max(len(t.ids) for _, t in tracked)
    slices: list[_ParamSlice] = []
    for index, value in enumerate(node.inputs):
        if value is None or value in cg.tracked:
            continue
        array = constant_array(value)
        if array is None:
            _freeze_inputs(cg, node, f"{label} mixes channels with runtime value '{value.name}'")
            return
        if array.ndim > rank:
            _freeze_inputs(cg, node, f"{label} broadcasts a constant beyond the channel tensor")
            return
        axis = 1 - (rank - array.ndim)
        if axis < 0 or array.shape[axis] == 1:
            continue
        if array.shape[axis] != channels:
            _freeze_inputs(cg, node, f"{label} constant '{value.name}' does not match channels")
            return
        slices.append(_ParamSlice(node, index, axis, node.outputs[0]))
    full = [t for _, t in tracked if len(t.ids) == channels]
    for _, t in tracked:
        if len(t.ids) != channels:
            cg._freeze(t.ids, f"{label} broadcasts a {len(t.ids)}-channel tensor")
    for other in full[1:]:
        cg._union(full[0].ids, other.ids)
    cg._param_slices.extend(slices)
    cg.tracked[node.outputs[0]] = _Tracked(full[0].ids, rank)


def _normalized_axis(node: ir.Node, rank: int, default: int) -> int:
    axis = node.attributes.get_int("axis", default)
    return axis + rank if axis < 0 else axis


def _concat(cg: ChannelGraph, node: ir.Node) -> None:
    label = describe_node(node)
    parts = [cg.tracked.get(v) if v is not None else None for v in node.inputs]
    if any(p is None for p in parts):
        _freeze_inputs(cg, node, f"{label} joins channels with a tensor of unknown channels")
        return
    tracked = [p for p in parts if p is not None]
    rank = tracked[0].rank
    if any(t.rank != rank for t in tracked):
        _freeze_inputs(cg, node, f"{label} joins tensors of different ranks")
        return
    axis = _normalized_axis(node, rank, 1)
    if axis == 1:
        cg.tracked[node.outputs[0]] = _Tracked(np.concatenate([t.ids for t in tracked]), rank)
        return
    if any(len(t.ids) != len(tracked[0].ids) for t in tracked):
        _freeze_inputs(cg, node, f"{label} joins tensors of different channel counts")
        return
    for other in tracked[1:]:  # joined along another axis, channel k of each input is one channel
        cg._union(tracked[0].ids, other.ids)
    cg.tracked[node.outputs[0]] = _Tracked(tracked[0].ids, rank)


def _split_sizes(node: ir.Node, channels: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = constant_array(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes.reshape(-1)]
    attribute = node.attributes.get_ints("split")
    if attribute:
        return [int(s) for s in attribute]
    count = len(node.outputs)
    if channels % count:
        return None
    return [channels // count] * count


def _split(cg: ChannelGraph, node: ir.Node) -> None:
    if node.inputs[0] not in cg.tracked:
        _freeze_inputs(cg, node, f"reads channels through a side input of {describe_node(node)}")
        return
    source = cg.tracked[node.inputs[0]]
    axis = _normalized_axis(node, source.rank, 0)
    if axis != 1:
        for out in node.outputs:
            cg.tracked[out] = _Tracked(source.ids, source.rank)
        return
    sizes = _split_sizes(node, len(source.ids))
    if sizes is None or sum(sizes) != len(source.ids) or len(sizes) != len(node.outputs):
        _freeze_inputs(cg, node, f"{describe_node(node)} has split sizes prune cannot read")
        return
    offset = 0
    for out, size in zip(node.outputs, sizes, strict=True):
        cg.tracked[out] = _Tracked(source.ids[offset : offset + size], source.rank)
        offset += size
    cg._splits.append(_SplitOnChannels(node))


def _slice(cg: ChannelGraph, node: ir.Node) -> None:
    label = describe_node(node)
    if node.inputs[0] not in cg.tracked:
        _freeze_inputs(cg, node, f"reads channels through a side input of {label}")
        return
    source = cg.tracked[node.inputs[0]]
    arrays = [constant_array(v) if v is not None else None for v in node.inputs[1:5]]
    starts, ends = arrays[0], arrays[1]
    if (
        starts is None
        or ends is None
        or any(
            v is not None and a is None for v, a in zip(node.inputs[3:5], arrays[2:], strict=False)
        )
    ):
        _freeze_inputs(cg, node, f"{label} has runtime starts/ends/axes/steps")
        return
    count = starts.size
    axes_array = arrays[2] if len(arrays) > 2 else None
    steps_array = arrays[3] if len(arrays) > 3 else None
    axes = (
        [int(a) for a in axes_array.reshape(-1)] if axes_array is not None else list(range(count))
    )
    axes = [a + source.rank if a < 0 else a for a in axes]
    if 1 not in axes:
        cg.tracked[node.outputs[0]] = _Tracked(source.ids, source.rank)
        return
    position = axes.index(1)
    step = int(steps_array.reshape(-1)[position]) if steps_array is not None else 1
    if step != 1:
        _freeze_inputs(cg, node, f"{label} slices channels with step {step}")
        return
    channels = len(source.ids)
    start, end = _clamp_slice(
        int(starts.reshape(-1)[position]), int(ends.reshape(-1)[position]), channels
    )
    cg.tracked[node.outputs[0]] = _Tracked(source.ids[start:end], source.rank)
    cg._slices.append(_SliceOnChannels(node, position, channels))


def _clamp_slice(start: int, end: int, channels: int) -> tuple[int, int]:
    start = start + channels if start < 0 else start
    end = end + channels if end < 0 else end
    start = min(max(start, 0), channels)
    end = min(max(end, 0), channels)
    return start, max(start, end)


def _resize(cg: ChannelGraph, node: ir.Node) -> None:
    label = describe_node(node)
    if node.inputs[0] not in cg.tracked:
        _freeze_inputs(cg, node, f"reads channels through a side input of {label}")
        return
    scale_index = 1 if node.op_type == "Upsample" else 2
    scales = constant_array(node.inputs[scale_index]) if len(node.inputs) > scale_index else None
    sizes_value = node.inputs[3] if node.op_type == "Resize" and len(node.inputs) > 3 else None
    if sizes_value is not None or scales is None or scales.size < 2:
        _freeze_inputs(cg, node, f"{label} is not resized by constant scales")
        return
    if float(scales.reshape(-1)[1]) != 1.0:
        _freeze_inputs(cg, node, f"{label} rescales the channel axis")
        return
    _forward(cg, node, 0)


def _batch_norm(cg: ChannelGraph, node: ir.Node) -> None:
    label = describe_node(node)
    parameters = range(1, 5) if node.op_type == "BatchNormalization" else range(1, 3)
    extra = [v for v in node.outputs[1:] if v is not None and (v.uses() or v.is_graph_output())]
    if node.inputs[0] not in cg.tracked or extra:
        _freeze_inputs(cg, node, f"{label} is not an inference normalisation of its input")
        return
    channels = len(cg.tracked[node.inputs[0]].ids)
    for index in parameters:
        array = constant_array(node.inputs[index]) if len(node.inputs) > index else None
        if array is None or array.shape != (channels,):
            _freeze_inputs(cg, node, f"{label} has non-constant or mis-shaped parameters")
            return
    _forward(cg, node, 0)
    cg._param_slices.extend(_ParamSlice(node, i, 0, node.outputs[0]) for i in parameters)


def _pad(cg: ChannelGraph, node: ir.Node) -> None:
    label = describe_node(node)
    source = cg.tracked.get(node.inputs[0]) if node.inputs[0] is not None else None
    pads = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        pads = np.asarray(node.attributes.get_ints("pads", ()) or [], dtype=np.int64)
    has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
    if source is None or has_axes or pads.size != 2 * source.rank:
        _freeze_inputs(cg, node, f"{label} pads in a way prune does not read")
        return
    if pads[1] != 0 or pads[source.rank + 1] != 0:
        _freeze_inputs(cg, node, f"{label} pads the channel axis")
        return
    _forward(cg, node, 0)


_HANDLERS = {
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Resize": _resize,
    "Upsample": _resize,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _batch_norm,
    "Pad": _pad,
}


def _build_groups(cg: ChannelGraph) -> None:
    """Units are union-find roots; creators sharing a unit fall into one group."""
    count = len(cg._parent)
    roots = np.array([cg._find(i) for i in range(count)], dtype=np.int64)
    creator_parent = list(range(len(cg._creators)))

    def find(c: int) -> int:
        while creator_parent[c] != c:
            creator_parent[c] = creator_parent[creator_parent[c]]
            c = creator_parent[c]
        return c

    first_creator_of_root: dict[int, int] = {}
    for i in range(count):
        creator = cg._creator[i]
        root = int(roots[i])
        if root in first_creator_of_root:
            a, b = find(first_creator_of_root[root]), find(creator)
            if a != b:
                creator_parent[max(a, b)] = min(a, b)
        else:
            first_creator_of_root[root] = creator
    frozen_root: dict[int, str] = {}
    for i, reason in sorted(cg._frozen.items()):
        frozen_root.setdefault(int(roots[i]), reason)

    members: dict[int, list[int]] = {}
    for creator in range(len(cg._creators)):
        members.setdefault(find(creator), []).append(creator)
    consumers_by_root: dict[int, list[ir.Node]] = {}
    for role in cg.convs:
        if role.depthwise:
            continue
        units = cg.units_of(role.node.inputs[0])
        for unit in [] if units is None else np.unique(units).tolist():
            consumers_by_root.setdefault(unit, []).append(role.node)
    for creators in members.values():
        producers = tuple(n for n in (cg._creators[c] for c in creators) if n is not None)
        if not producers:
            continue
        ids = np.flatnonzero(np.isin(np.asarray(cg._creator), creators))
        group_units = list(dict.fromkeys(roots[ids].tolist()))
        consumers: dict[int, ir.Node] = {}
        for unit in group_units:
            for node in consumers_by_root.get(unit, []):
                consumers.setdefault(id(node), node)
        frozen = next((frozen_root[u] for u in group_units if u in frozen_root), None)
        group = ChannelGroup(
            index=len(cg.groups),
            units=np.asarray(group_units, dtype=np.int64),
            producers=producers,
            consumers=tuple(consumers.values()),
            frozen=frozen,
        )
        if not group.consumers and frozen is None:
            group.frozen = "no Conv reads its channels"
        cg.groups.append(group)


# --- the rewrite -----------------------------------------------------------------------------


def remove_units(graph: ir.Graph, cg: ChannelGraph, removed: np.ndarray) -> None:
    """Cut the channels of ``removed`` units from every weight, constant and shape.

    Weights are sliced, not refit: recovery is the caller's business (see ``passes/prune.py``).
    """
    removed = np.asarray(removed, dtype=np.int64)

    def mask(value: ir.Value | None) -> np.ndarray | None:
        keep = cg.keep_mask(value, removed)
        return None if keep is None or keep.all() else keep

    for role in cg.convs:
        node = role.node
        weight = role.weight
        keep_out = mask(node.outputs[0])
        keep_in = None if role.depthwise else mask(node.inputs[0])
        if keep_out is None and keep_in is None:
            continue
        label = node_label(node)
        if keep_out is not None:
            weight = weight[keep_out]
            bias_value = node.inputs[2] if len(node.inputs) > 2 else None
            bias = constant_array(bias_value)
            if bias is not None:
                base = bias_value.name if bias_value is not None and bias_value.name else label
                set_constant_input(graph, node, 2, bias[keep_out], f"{base}_pruned")
            if role.depthwise:
                node.attributes["group"] = ir.AttrInt64("group", int(keep_out.sum()))
        if keep_in is not None:
            weight = weight[:, keep_in]
        weight_value = node.inputs[1]
        base = weight_value.name if weight_value is not None and weight_value.name else label
        set_constant_input(graph, node, 1, np.ascontiguousarray(weight), f"{base}_pruned")
    for edit in cg._param_slices:
        keep = mask(edit.carrier)
        array = constant_array(edit.node.inputs[edit.input_index])
        if keep is None or array is None:
            continue
        value = edit.node.inputs[edit.input_index]
        base = value.name if value is not None and value.name else node_label(edit.node)
        sliced = np.take(array, np.flatnonzero(keep), axis=edit.axis)
        set_constant_input(graph, edit.node, edit.input_index, sliced, f"{base}_pruned")
    for split in cg._splits:
        sizes = []
        for out in split.node.outputs:
            keep = cg.keep_mask(out, removed)
            sizes.append(int(keep.sum()) if keep is not None else 0)
        _set_split_sizes(graph, split.node, sizes)
    for cut in cg._slices:
        keep = cg.keep_mask(cut.node.inputs[0], removed)
        if keep is None or keep.all():
            continue
        _rewrite_slice(graph, cut, keep)
    for value in cg.tracked:
        keep = cg.keep_mask(value, removed)
        if keep is None or value.shape is None or len(value.shape) <= 1:
            continue
        dims = list(value.shape)
        dims[1] = int(keep.sum())
        value.shape = ir.Shape(dims)


def _set_split_sizes(graph: ir.Graph, node: ir.Node, sizes: list[int]) -> None:
    array = np.asarray(sizes, dtype=np.int64)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        set_constant_input(graph, node, 1, array, f"{node_label(node)}_split_pruned")
    elif "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
    else:  # opset 18 `num_outputs`: an uneven cut needs explicit sizes
        node.attributes.pop("num_outputs", None)
        set_constant_input(graph, node, 1, array, f"{node_label(node)}_split_pruned")


def _rewrite_slice(graph: ir.Graph, edit: _SliceOnChannels, keep: np.ndarray) -> None:
    node = edit.node
    starts = constant_array(node.inputs[1])
    ends = constant_array(node.inputs[2])
    assert starts is not None and ends is not None  # checked by the analysis
    start, end = _clamp_slice(
        int(starts.reshape(-1)[edit.position]), int(ends.reshape(-1)[edit.position]), edit.channels
    )
    new_starts = starts.copy().reshape(-1)
    new_ends = ends.copy().reshape(-1)
    new_starts[edit.position] = int(keep[:start].sum())
    new_ends[edit.position] = int(keep[:end].sum())
    label = node_label(node)
    set_constant_input(graph, node, 1, new_starts.astype(starts.dtype), f"{label}_starts_pruned")
    set_constant_input(graph, node, 2, new_ends.astype(ends.dtype), f"{label}_ends_pruned")
