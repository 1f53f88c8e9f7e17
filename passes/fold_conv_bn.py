"""fold-conv-bn: fold an inference BatchNormalization into the Conv feeding it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from detc.compiler.ir.pass_base import NoMatch, RewritePass, node_label
from detc.passes._conv_affine import FoldableConv, fold_affine_into_conv, foldable_conv
from detc.passes._graph_facts import constant_array

_BN_PARAMETERS = ("scale", "bias", "mean", "var")
_DEFAULT_EPSILON = 1e-5


@dataclass(frozen=True)
class ConvBatchNorm:
    """What ``rewrite`` needs: the Conv, the BatchNormalization and its per-channel affine map."""

    target: FoldableConv
    batch_norm: ir.Node
    scale: np.ndarray  # float64, gamma / sqrt(var + eps)
    shift: np.ndarray  # float64, beta - mean * scale


class FoldConvBatchNormPass(RewritePass[ConvBatchNorm]):
    """Fold an inference BatchNormalization into the Conv feeding it.

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * s) + (b - mean) * s + beta,   s = gamma / sqrt(var + eps)

    Exact in real arithmetic; computed in float64 and cast back to W's dtype (fp16 models too).
    Plain, grouped and depthwise Conv, with or without bias. Fires only when the Conv's output
    feeds this BatchNormalization alone and W, b, gamma, beta, mean and var are constants.

    Written here rather than delegated to onnxscript's ``fuse_batchnorm`` rule, which computes in
    the weight's dtype (fp16 stays fp16), accepts only initializers (not Constant nodes), does not
    look at ``training_mode``, and cannot say per node why it did not fire.
    """

    name = "fold-conv-bn"
    exact = True
    anchor_op_types: ClassVar[tuple[str, ...]] = ("BatchNormalization",)

    def match(self, node: ir.Node) -> ConvBatchNorm | NoMatch:
        label = f"BatchNormalization '{node_label(node)}'"
        training_mode = node.attributes.get_int("training_mode", 0)
        if training_mode:
            return NoMatch(f"{label} has training_mode={training_mode}")
        if node.attributes.get_int("spatial", 1) != 1:
            return NoMatch(f"{label} has spatial=0 (per-element statistics); only spatial=1 folds")
        # Before opset 14 the number of outputs selected training mode; after, they are
        # training-only statistics. Either way Y is not the inference formula when they exist.
        extra = [v.name for v in node.outputs[1:] if v.name]
        if extra:
            return NoMatch(f"{label} also computes running statistics ({', '.join(extra)})")
        if len(node.inputs) < 5 or node.inputs[0] is None:
            return NoMatch(f"{label} has {len(node.inputs)} inputs; expected 5")

        target = foldable_conv(node, node.inputs[0])
        if isinstance(target, NoMatch):
            return target

        params: list[np.ndarray] = []
        for role, value in zip(_BN_PARAMETERS, node.inputs[1:5], strict=True):
            array = constant_array(value)
            if array is None:
                name = f" '{value.name}'" if value is not None else ""
                return NoMatch(f"{label} {role}{name} is not a constant")
            if array.dtype.kind != "f":
                return NoMatch(f"{label} {role} has dtype {array.dtype}; expected a float type")
            if array.shape != (target.out_channels,):
                return NoMatch(
                    f"{label} {role} has shape {list(array.shape)} but Conv "
                    f"'{node_label(target.conv)}' has {target.out_channels} output channels"
                )
            params.append(array.astype(np.float64))
        gamma, beta, mean, var = params
        epsilon = node.attributes.get_float("epsilon", _DEFAULT_EPSILON)
        denominator = var + epsilon
        if np.any(denominator <= 0):
            return NoMatch(f"{label} has var + epsilon <= 0 in some channel")
        scale = gamma / np.sqrt(denominator)
        return ConvBatchNorm(target, node, scale, beta - mean * scale)

    def rewrite(self, match: ConvBatchNorm, graph: ir.Graph) -> None:
        fold_affine_into_conv(graph, match.target, match.batch_norm, match.scale, match.shift)
