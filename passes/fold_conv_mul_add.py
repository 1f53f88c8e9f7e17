"""fold-conv-mul-add: fold a per-channel constant Mul / Add after a Conv into its weight, bias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from detc.compiler.ir.pass_base import NoMatch, PassResult, RewritePass, node_label
from detc.passes._conv_affine import FoldableConv, fold_affine_into_conv, foldable_conv
from detc.passes._graph_facts import constant_array, describe_source, is_onnx_op


@dataclass(frozen=True)
class ConvAffine:
    """What ``rewrite`` needs: the Conv, the Mul or Add to absorb, and its per-channel effect."""

    target: FoldableConv
    absorbed: ir.Node
    scale: np.ndarray  # float64 per output channel (ones for an Add)
    shift: np.ndarray  # float64 per output channel (zeros for a Mul)


def per_channel_vector(constant: np.ndarray, output_rank: int, channels: int) -> np.ndarray | str:
    """``constant`` as a float64 vector over the output channels, or why it is not one.

    ``constant`` broadcasts against the Conv output (N, C, spatial...) right-aligned; it folds
    when every axis but C has extent 1 and C has extent 1 or ``channels``: scalar, [C,1,1],
    [1,C,1,1] and the like. Anything else varies over batch or space, which no Conv bias can.
    """
    shape = list(constant.shape)
    if len(shape) > output_rank:
        return f"has rank {len(shape)}, above the Conv output's {output_rank} (it would broadcast)"
    aligned = [1] * (output_rank - len(shape)) + shape
    channel_extent = aligned[1]
    others_are_one = all(extent == 1 for axis, extent in enumerate(aligned) if axis != 1)
    if not others_are_one or channel_extent not in (1, channels):
        return (
            f"has shape {shape}, which is not per-channel for a Conv with {channels} output "
            f"channels (fold needs a scalar, [{channels},1,...] or [1,{channels},1,...])"
        )
    vector = constant.reshape(aligned)[(0, slice(None)) + (0,) * (output_rank - 2)]
    return np.broadcast_to(vector.astype(np.float64), (channels,)).copy()


class FoldConvMulAddPass(RewritePass[ConvAffine]):
    """Fold a per-channel constant Mul and/or Add that follows a Conv into its weight and bias.

    conv(x, W, b) * s = conv(x, W * s) + b * s;   conv(x, W, b) + t = conv(x, W) + (b + t)
    with s, t a scalar, [C,1,1] or [1,C,1,1]. Exact in real arithmetic, computed in float64 and
    cast back to W's dtype. Fires only when the Conv's output feeds that Mul/Add alone; repeats
    until nothing more folds, so Conv -> Mul -> Add becomes one Conv.
    """

    name = "fold-conv-mul-add"
    exact = True
    anchor_op_types: ClassVar[tuple[str, ...]] = ("Mul", "Add")

    def match(self, node: ir.Node) -> ConvAffine | NoMatch:
        label = f"{node.op_type} '{node_label(node)}'"
        if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
            return NoMatch(f"{label} does not have two inputs")
        lhs, rhs = node.inputs[0], node.inputs[1]
        from_conv = [v for v in (lhs, rhs) if is_onnx_op(v.producer(), "Conv")]
        if not from_conv:
            return NoMatch(
                f"neither input of {label} comes from a Conv "
                f"({describe_source(lhs)}, {describe_source(rhs)})"
            )
        # With a Conv on both sides, fold into the one whose other operand is constant.
        conv_output, operand = from_conv[0], rhs if from_conv[0] is lhs else lhs
        if len(from_conv) == 2 and constant_array(rhs) is not None:
            conv_output, operand = rhs, lhs
        constant = constant_array(operand)
        if constant is None:
            return NoMatch(
                f"{label} combines a Conv output with '{operand.name}' from "
                f"{describe_source(operand)}, which is not a constant"
            )
        target = foldable_conv(node, conv_output)
        if isinstance(target, NoMatch):
            return target
        if constant.dtype.kind != "f":
            return NoMatch(f"{label} constant has dtype {constant.dtype}; expected a float type")
        vector = per_channel_vector(constant, target.output_rank, target.out_channels)
        if isinstance(vector, str):
            return NoMatch(f"{label} constant '{operand.name}' {vector}")
        if node.op_type == "Mul":
            return ConvAffine(target, node, vector, np.zeros_like(vector))
        return ConvAffine(target, node, np.ones_like(vector), vector)

    def rewrite(self, match: ConvAffine, graph: ir.Graph) -> None:
        fold_affine_into_conv(graph, match.target, match.absorbed, match.scale, match.shift)

    def call(self, model: ir.Model) -> PassResult:
        # One sweep in graph order already folds Conv -> Mul -> Add when the graph is sorted;
        # repeating until nothing changes also covers graphs stored out of order.
        modified = False
        while super().call(model).modified:
            modified = True
        return PassResult(model, modified)
