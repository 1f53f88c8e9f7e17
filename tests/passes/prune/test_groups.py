"""Channel dependency analysis: which channels go together, and cutting them keeps the function.

The numerical oracle: removing units is the same function as keeping every channel but zeroing
the columns of the removed channels in every Conv that reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from detc.compiler.tolerances import FP32_EXACT
from detc.passes._graph_facts import set_constant_input
from detc.passes.prune.groups import ChannelGraph, analyze_channels, remove_units
from tests._models import (
    assert_outputs_close,
    make_model,
    random_inputs,
    run_ort,
    value_info,
)

SIZE = 6


def _conv(
    rng: np.random.Generator,
    inits: dict[str, np.ndarray],
    name: str,
    source: str,
    cin: int,
    cout: int,
    *,
    kernel: int = 1,
    group: int = 1,
) -> onnx.NodeProto:
    inits[f"{name}_w"] = rng.normal(0, 0.5, (cout, cin // group, kernel, kernel)).astype(np.float32)
    inits[f"{name}_b"] = rng.normal(0, 0.5, cout).astype(np.float32)
    return helper.make_node(
        "Conv",
        [source, f"{name}_w", f"{name}_b"],
        [name],
        name=name,
        group=group,
        pads=[kernel // 2] * 4,
    )


def _silu(source: str, name: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Sigmoid", [source], [f"{name}_sig"], name=f"{name}_sig"),
        helper.make_node("Mul", [source, f"{name}_sig"], [name], name=f"{name}_mul"),
    ]


def _model(
    nodes: Sequence[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    out_channels: int,
    *,
    in_channels: int = 3,
    outputs: Sequence[tuple[str, Sequence[int]]] | None = None,
) -> ir.Model:
    outs = outputs or [("y", [1, out_channels, SIZE, SIZE])]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, in_channels, SIZE, SIZE])],
        [value_info(name, np.float32, shape) for name, shape in outs],
        inits,
    )


def residual_model(rng: np.random.Generator) -> ir.Model:
    """a (3->8) -> SiLU -> [b (8->8, 3x3) -> SiLU] + residual -> c (8->4)."""
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv(rng, inits, "a", "x", 3, 8), *_silu("a", "a_act")]
    nodes += [_conv(rng, inits, "b", "a_act", 8, 8, kernel=3), *_silu("b", "b_act")]
    nodes += [helper.make_node("Add", ["a_act", "b_act"], ["sum"], name="add")]
    nodes += [_conv(rng, inits, "c", "sum", 8, 4)]
    nodes += [helper.make_node("Identity", ["c"], ["y"], name="out")]
    return _model(nodes, inits, 4)


def concat_model(rng: np.random.Generator) -> ir.Model:
    """a (3->4) and b (3->6) concatenated (with a MaxPool and a Resize in between) -> c."""
    inits: dict[str, np.ndarray] = {"scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [_conv(rng, inits, "a", "x", 3, 4), _conv(rng, inits, "b", "x", 3, 6)]
    nodes += [
        helper.make_node("Relu", ["a"], ["a_act"], name="a_relu"),
        helper.make_node(
            "MaxPool", ["b"], ["b_pool"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Concat", ["a_act", "b_pool", "a_act"], ["cat"], name="cat", axis=1),
        helper.make_node("Resize", ["cat", "", "scales"], ["up"], name="up", mode="nearest"),
        helper.make_node(
            "MaxPool", ["up"], ["down"], name="down", kernel_shape=[2, 2], strides=[2, 2]
        ),
    ]
    nodes += [_conv(rng, inits, "c", "down", 14, 5, kernel=3)]
    nodes += [helper.make_node("Identity", ["c"], ["y"], name="out")]
    return _model(nodes, inits, 5)


def split_model(rng: np.random.Generator) -> ir.Model:
    """a (3->8) -> Split [3, 5] on channels -> b reads part 0, a Slice [1:4] of part 1 feeds c."""
    inits: dict[str, np.ndarray] = {
        "sizes": np.array([3, 5], np.int64),
        "starts": np.array([1], np.int64),
        "ends": np.array([4], np.int64),
        "axes": np.array([1], np.int64),
    }
    nodes = [
        _conv(rng, inits, "a", "x", 3, 8),
        helper.make_node("Split", ["a", "sizes"], ["p0", "p1"], name="split", axis=1),
        helper.make_node("Slice", ["p1", "starts", "ends", "axes"], ["p1s"], name="slice"),
        _conv(rng, inits, "b", "p0", 3, 4),
        _conv(rng, inits, "c", "p1s", 3, 4),
        helper.make_node("Add", ["b", "c"], ["y"], name="join"),
    ]
    return _model(nodes, inits, 4)


def depthwise_model(rng: np.random.Generator) -> ir.Model:
    """a (3->8) -> BatchNorm -> depthwise 3x3 (group 8) -> ReLU -> c (8->4)."""
    inits: dict[str, np.ndarray] = {
        "gamma": rng.uniform(0.5, 2, 8).astype(np.float32),
        "beta": rng.normal(0, 1, 8).astype(np.float32),
        "mean": rng.normal(0, 1, 8).astype(np.float32),
        "var": rng.uniform(0.5, 2, 8).astype(np.float32),
        "scale": rng.uniform(0.5, 2, (8, 1, 1)).astype(np.float32),
    }
    nodes = [
        _conv(rng, inits, "a", "x", 3, 8),
        helper.make_node(
            "BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["a_bn"], name="bn"
        ),
        _conv(rng, inits, "dw", "a_bn", 8, 8, kernel=3, group=8),
        helper.make_node("Mul", ["dw", "scale"], ["dw_scaled"], name="per_channel"),
        helper.make_node("Relu", ["dw_scaled"], ["dw_act"], name="dw_relu"),
        _conv(rng, inits, "c", "dw_act", 8, 4),
        helper.make_node("Identity", ["c"], ["y"], name="out"),
    ]
    return _model(nodes, inits, 4)


def head_model(rng: np.random.Generator) -> ir.Model:
    """a (3->8) -> SiLU -> head (8->6) -> Reshape to (1, 2, 3, 36): the head's layout is fixed."""
    inits: dict[str, np.ndarray] = {"shape": np.array([1, 2, 3, SIZE * SIZE], np.int64)}
    nodes = [_conv(rng, inits, "a", "x", 3, 8), *_silu("a", "a_act")]
    nodes += [_conv(rng, inits, "head", "a_act", 8, 6)]
    nodes += [helper.make_node("Reshape", ["head", "shape"], ["y"], name="layout")]
    return _model(nodes, inits, 6, outputs=[("y", [1, 2, 3, SIZE * SIZE])])


def producer(cg: ChannelGraph, name: str):
    for group in cg.groups:
        if any(p.name == name for p in group.producers):
            return group
    raise AssertionError(f"no group produced by {name}")


def masked_copy(model: ir.Model, removed: np.ndarray) -> ir.Model:
    """The oracle: same channels, but the removed ones are read with zero weight."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    cg = analyze_channels(copy.graph)
    for role in cg.convs:
        if role.depthwise:
            continue
        keep = cg.keep_mask(role.node.inputs[0], removed)
        if keep is None or keep.all():
            continue
        weight = role.weight.copy()
        weight[:, ~keep] = 0.0
        set_constant_input(copy.graph, role.node, 1, weight, f"{role.node.name}_masked")
    return copy


def assert_removal_is_exact(model: ir.Model, removed: np.ndarray, rng: np.random.Generator):
    feeds = random_inputs(model, rng)
    expected = run_ort(masked_copy(model, removed), feeds)
    out_shapes = {v.name: str(v.shape) for v in model.graph.outputs}
    cg = analyze_channels(model.graph)
    remove_units(model.graph, cg, removed)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {v.name: str(v.shape) for v in model.graph.outputs} == out_shapes
    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


# --- groups -------------------------------------------------------------------------------------


def test_residual_add_couples_both_producers(rng: np.random.Generator) -> None:
    cg = analyze_channels(residual_model(rng).graph)
    group = producer(cg, "a")
    assert {p.name for p in group.producers} == {"a", "b"}
    assert group.size == 8 and group.frozen is None
    assert {c.name for c in group.consumers} == {"b", "c"}
    a_out = next(v for v in cg.tracked if v.name == "a")
    b_out = next(v for v in cg.tracked if v.name == "b")
    np.testing.assert_array_equal(cg.units_of(a_out), cg.units_of(b_out))


def test_concat_keeps_offsets_and_groups_apart(rng: np.random.Generator) -> None:
    cg = analyze_channels(concat_model(rng).graph)
    a, b = producer(cg, "a"), producer(cg, "b")
    assert a is not b and a.size == 4 and b.size == 6
    cat = next(v for v in cg.tracked if v.name == "cat")
    expected = np.concatenate([a.units, b.units, a.units])
    np.testing.assert_array_equal(cg.units_of(cat), expected)
    assert [c.name for c in a.consumers] == ["c"] == [c.name for c in b.consumers]


def test_split_and_slice_cut_the_ids(rng: np.random.Generator) -> None:
    cg = analyze_channels(split_model(rng).graph)
    a = producer(cg, "a")
    p0 = next(v for v in cg.tracked if v.name == "p0")
    sliced = next(v for v in cg.tracked if v.name == "p1s")
    np.testing.assert_array_equal(cg.units_of(p0), a.units[:3])
    np.testing.assert_array_equal(cg.units_of(sliced), a.units[4:7])
    assert {c.name for c in a.consumers} == {"b", "c"}


def test_depthwise_conv_passes_channels_through(rng: np.random.Generator) -> None:
    cg = analyze_channels(depthwise_model(rng).graph)
    a = producer(cg, "a")
    dw_out = next(v for v in cg.tracked if v.name == "dw")
    np.testing.assert_array_equal(cg.units_of(dw_out), a.units)
    assert [c.name for c in a.consumers] == ["c"]
    assert [r.node.name for r in cg.convs if r.depthwise] == ["dw"]


def test_detection_head_layout_and_unknown_ops_stop_the_group(rng: np.random.Generator) -> None:
    cg = analyze_channels(head_model(rng).graph)
    assert producer(cg, "a").frozen is None
    head = producer(cg, "head")
    assert head.frozen == "feeds Reshape 'layout', whose channel layout is unknown"


def test_graph_output_channels_are_never_cut(rng: np.random.Generator) -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv(rng, inits, "a", "x", 3, 8), *_silu("a", "y")]
    cg = analyze_channels(_model(nodes, inits, 8).graph)
    assert producer(cg, "a").frozen == "its channels reach graph output 'y'"


def test_runtime_side_input_freezes_rather_than_guesses(rng: np.random.Generator) -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        _conv(rng, inits, "a", "x", 3, 8),
        _conv(rng, inits, "gate", "x", 3, 1),
        helper.make_node("Mul", ["a", "gate"], ["gated"], name="gating"),
        _conv(rng, inits, "c", "gated", 8, 4),
    ]
    model = _model(nodes, inits, 4, outputs=[("c", [1, 4, SIZE, SIZE])])
    cg = analyze_channels(model.graph)
    assert producer(cg, "gate").frozen == "Mul 'gating' broadcasts a 1-channel tensor"
    assert producer(cg, "a").frozen is None


# --- removal is exact ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "builder", [residual_model, concat_model, split_model, depthwise_model, head_model]
)
def test_removing_units_equals_zeroing_their_readers(rng: np.random.Generator, builder) -> None:
    model = builder(rng)
    cg = analyze_channels(model.graph)
    removed = np.concatenate(
        [g.units[rng.permutation(g.size)[: g.size // 2]] for g in cg.groups if g.frozen is None]
    )
    assert removed.size > 0
    assert_removal_is_exact(model, removed, rng)


def test_split_sizes_and_slice_bounds_follow_the_cut(rng: np.random.Generator) -> None:
    model = split_model(rng)
    cg = analyze_channels(model.graph)
    a = producer(cg, "a")
    removed = a.units[[0, 4, 5]]  # one channel of part 0; part 1 loses its 2nd and 3rd
    assert_removal_is_exact(model, removed, rng)
    nodes = {n.name: n for n in model.graph}
    sizes = nodes["split"].inputs[1]
    assert sizes is not None and sizes.const_value is not None
    assert sizes.const_value.numpy().tolist() == [2, 3]
    starts, ends = nodes["slice"].inputs[1], nodes["slice"].inputs[2]
    assert starts is not None and ends is not None
    assert starts.const_value is not None and ends.const_value is not None
    # part 1 keeps positions 0, 3, 4: [1:4] of the old part is [1:2] of the new one
    assert (starts.const_value.numpy()[0], ends.const_value.numpy()[0]) == (1, 2)


def test_depthwise_group_count_and_per_channel_constants_shrink(rng: np.random.Generator) -> None:
    model = depthwise_model(rng)
    cg = analyze_channels(model.graph)
    removed = producer(cg, "a").units[[1, 2, 6]]
    assert_removal_is_exact(model, removed, rng)
    nodes = {n.name: n for n in model.graph}
    assert nodes["dw"].attributes.get_int("group") == 5
    gamma = nodes["bn"].inputs[1]
    scale = nodes["per_channel"].inputs[1]
    assert gamma is not None and gamma.const_value is not None
    assert scale is not None and scale.const_value is not None
    assert gamma.const_value.numpy().shape == (5,)
    assert scale.const_value.numpy().shape == (5, 1, 1)
