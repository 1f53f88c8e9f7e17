"""Folding a per-output-channel affine map ``y = conv(x) * scale + shift`` into the Conv itself.

    conv(x, W, b) * s + t = conv(x, W * s) + (b * s + t)     (s, t per output channel)

holds for plain, grouped and depthwise Conv alike, because axis 0 of the weight is always the
output channel. Shared by fold-conv-bn and fold-conv-mul-add; the arithmetic runs in float64 and
is cast back to the weight's dtype once, so fp16 models lose no more than one rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from detc.compiler.ir.pass_base import NoMatch, node_label
from detc.passes._graph_facts import (
    constant_array,
    describe_node,
    describe_source,
    drop_if_unused,
    exclusive_use_reason,
    forward_value,
    is_onnx_op,
    set_constant_input,
)


@dataclass(frozen=True)
class FoldableConv:
    """A Conv whose only reader is the node to absorb, with its constant weight and bias."""

    conv: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def output_rank(self) -> int:
        """Rank of the Conv's output: the weight's rank (N, C, spatial... vs M, C/g, kernel...)."""
        return int(self.weight.ndim)


def foldable_conv(consumer: ir.Node, value: ir.Value) -> FoldableConv | NoMatch:
    """The Conv producing ``value`` if the affine node ``consumer`` can be folded into it."""
    conv = value.producer()
    if conv is None:
        return NoMatch(
            f"input of {describe_node(consumer)} is {describe_source(value)}, not a Conv output"
        )
    if not is_onnx_op(conv, "Conv"):
        return NoMatch(
            f"input of {describe_node(consumer)} is produced by {describe_node(conv)}, not a Conv"
        )
    shared = exclusive_use_reason(value, conv, consumer)
    if shared:
        return NoMatch(shared)
    label = node_label(conv)
    weight_value = conv.inputs[1] if len(conv.inputs) > 1 else None
    weight = constant_array(weight_value)
    if weight is None:
        name = f" '{weight_value.name}'" if weight_value is not None else ""
        return NoMatch(f"Conv '{label}' weight{name} is not a constant")
    if weight.dtype.kind != "f":
        return NoMatch(
            f"Conv '{label}' weight has dtype {weight.dtype}; only float16/32/64 weights are folded"
        )
    if weight.ndim < 3:
        return NoMatch(f"Conv '{label}' weight has rank {weight.ndim}; expected at least 3")
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = None
    if bias_value is not None:
        bias = constant_array(bias_value)
        if bias is None:
            return NoMatch(f"Conv '{label}' bias '{bias_value.name}' is not a constant")
        if bias.shape != (weight.shape[0],):
            return NoMatch(
                f"Conv '{label}' bias has shape {list(bias.shape)}; expected [{weight.shape[0]}]"
            )
    return FoldableConv(conv, weight, bias)


def fold_affine_into_conv(
    graph: ir.Graph,
    target: FoldableConv,
    absorbed: ir.Node,
    scale: np.ndarray,
    shift: np.ndarray,
) -> None:
    """Give ``target.conv`` weight ``W*scale`` and bias ``b*scale+shift``; remove ``absorbed``.

    ``scale`` and ``shift`` are float64 vectors of length ``target.out_channels``. Readers of
    ``absorbed``'s output read the Conv's output instead; a graph output keeps its name.
    """
    conv = target.conv
    dtype = target.weight.dtype
    weight64 = target.weight.astype(np.float64)
    per_channel = (target.out_channels,) + (1,) * (weight64.ndim - 1)
    new_weight = (weight64 * scale.reshape(per_channel)).astype(dtype)
    bias64 = (
        target.bias.astype(np.float64)
        if target.bias is not None
        else np.zeros(target.out_channels, dtype=np.float64)
    )
    new_bias = (bias64 * scale + shift).astype(dtype)

    label = node_label(conv)
    weight_value = conv.inputs[1]
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    weight_base = weight_value.name if weight_value is not None and weight_value.name else label
    set_constant_input(graph, conv, 1, new_weight, f"{weight_base}_folded")
    bias_base = bias_value.name if bias_value is not None and bias_value.name else f"{label}_bias"
    set_constant_input(graph, conv, 2, new_bias, f"{bias_base}_folded")

    absorbed_inputs = list(absorbed.inputs)
    forward_value(graph, absorbed, kept=conv.outputs[0], dropped=absorbed.outputs[0])
    drop_if_unused(graph, absorbed_inputs)
