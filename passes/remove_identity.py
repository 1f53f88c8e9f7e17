"""remove-identity: remove Identity nodes and inference-mode Dropout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from detc.compiler.ir.pass_base import NoMatch, RewritePass
from detc.passes._graph_facts import constant_array, describe_node, forward_value


@dataclass(frozen=True)
class PassThrough:
    """A node whose first output equals its first input."""

    node: ir.Node
    source: ir.Value
    result: ir.Value


class RemoveIdentityPass(RewritePass[PassThrough]):
    """Remove Identity nodes and inference-mode Dropout (their output is their input).

    Readers of the output read the input instead. When the output is a graph output, the
    producer's value takes the output's name, so the model's interface is unchanged; the node is
    kept when that is impossible (its input is a graph input, an initializer or another graph
    output). Dropout goes only when ``training_mode`` is absent or a constant False and its mask
    output is unused.

    Not delegated to ``onnx_ir.passes.common.IdentityEliminationPass``: that pass knows nothing
    of Dropout, cannot explain per node, and (onnx-ir 1.1) loses a graph output when an Identity
    copies one graph output into another (the graph ends up with two outputs of the same name).
    """

    name = "remove-identity"
    exact = True
    anchor_op_types: ClassVar[tuple[str, ...]] = ("Identity", "Dropout")

    def match(self, node: ir.Node) -> PassThrough | NoMatch:
        label = describe_node(node)
        if not node.inputs or node.inputs[0] is None or not node.outputs:
            return NoMatch(f"{label} has no data input")
        if node.op_type == "Dropout":
            reason = _dropout_training_reason(node)
            if reason:
                return NoMatch(reason)
        source, result = node.inputs[0], node.outputs[0]
        if result.is_graph_output():
            if source.is_graph_input():
                return NoMatch(
                    f"{label} copies graph input '{source.name}' to graph output "
                    f"'{result.name}'; kept so the model keeps both names"
                )
            if source.is_graph_output():
                return NoMatch(
                    f"{label} copies graph output '{source.name}' to graph output "
                    f"'{result.name}'; kept so the model keeps both names"
                )
            if source.is_initializer() or source.producer() is None:
                return NoMatch(
                    f"{label} copies constant '{source.name}' to graph output "
                    f"'{result.name}'; kept so the output keeps its name"
                )
        return PassThrough(node, source, result)

    def rewrite(self, match: PassThrough, graph: ir.Graph) -> None:
        forward_value(graph, match.node, kept=match.source, dropped=match.result)


def _dropout_training_reason(node: ir.Node) -> str | None:
    """Why this Dropout may drop values (or why it cannot go), or None when it is an identity."""
    label = describe_node(node)
    graph = node.graph
    opset = graph.opset_imports.get("", 0) if graph is not None else 0
    if opset and opset < 7 and not node.attributes.get_int("is_test", 0):
        return f"{label} has is_test=0 (opset {opset} training mode)"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        flag = node.inputs[2]
        value = constant_array(flag)
        if value is None:
            return f"{label} training_mode '{flag.name}' is not a constant"
        if value.size != 1 or bool(value.reshape(-1)[0]):
            return f"{label} has training_mode=True (it drops values)"
    if len(node.outputs) > 1:
        mask = node.outputs[1]
        if mask.is_graph_output():
            return f"{label} mask output '{mask.name}' is a graph output"
        if mask.uses():
            user = next(iter(mask.uses()))[0]
            return f"{label} mask output '{mask.name}' is used by {describe_node(user)}"
    return None
