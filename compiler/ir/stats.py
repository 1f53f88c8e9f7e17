"""Size and cost of a graph: nodes, parameters, multiply-accumulates (for the pass instruments)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes


@dataclass(frozen=True)
class GraphStats:
    nodes: int
    parameters: int
    macs: int

    def __str__(self) -> str:
        return f"{self.nodes} nodes, {self.parameters:,} params, {self.macs / 1e6:,.1f} M MACs"


def _static_numel(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    dims = _dims(value)
    return None if dims is None else math.prod(dims)


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = [d for d in value.shape if isinstance(d, int)]
    return dims if len(dims) == len(value.shape) else None


def node_macs(node: ir.Node) -> int:
    """Multiply-accumulates of a Conv / ConvTranspose / Gemm / MatMul with static shapes, else 0."""
    if node.domain not in ("", "ai.onnx"):
        return 0
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.inputs) >= 2:
        weight = _dims(node.inputs[1])
        out = _static_numel(node.outputs[0])
        if weight is None or out is None:
            return 0
        if op == "Conv":
            # each output element reduces over (C_in / group) * kernel taps = weight.shape[1:]
            return out * math.prod(weight[1:])
        inp = _static_numel(node.inputs[0])
        return 0 if inp is None else inp * math.prod(weight[1:])
    if op in ("Gemm", "MatMul") and len(node.inputs) >= 2:
        a = _dims(node.inputs[0])
        out = _static_numel(node.outputs[0])
        if a is None or out is None or not a:
            return 0
        transposed = op == "Gemm" and bool(node.attributes.get_int("transA", 0))
        k = a[-2] if transposed else a[-1]
        return out * k
    return 0


def graph_stats(model: ir.Model, *, infer_shapes: bool = True) -> GraphStats:
    """Counts for the main graph. Shape inference runs first so that MACs can be computed."""
    if infer_shapes:
        model = common_passes.ShapeInferencePass()(model.clone()).model
    graph = model.graph
    params = sum(
        math.prod(v.const_value.shape.numpy()) if v.const_value is not None else 0
        for v in graph.initializers.values()
    )
    for node in graph:
        if node.op_type == "Constant" and node.outputs and node.outputs[0].shape is not None:
            params += _static_numel(node.outputs[0]) or 0
    macs = sum(node_macs(node) for node in graph)
    return GraphStats(nodes=len(graph), parameters=int(params), macs=int(macs))
