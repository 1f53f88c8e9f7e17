"""eliminate-dead-code: remove what no graph output depends on."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from detc.compiler.ir.pass_base import Candidate, DetcPass, PassResult, node_label
from detc.passes._graph_facts import describe_node, removed_nodes, structure_fingerprint


class EliminateDeadCodePass(DetcPass):
    """Remove nodes no graph output depends on, unused initializers, functions and opset imports.

    Wraps onnx-ir's RemoveUnusedNodesPass, RemoveUnusedFunctionsPass and RemoveUnusedOpsetsPass.
    The model's inputs and outputs never change. Also drops unused *optional* outputs of the
    nodes that stay (e.g. a Dropout mask nobody reads), which onnx-ir does without reporting it;
    ``modified`` here is computed from the graph itself, so it does count that.
    """

    name = "eliminate-dead-code"
    exact = True

    def call(self, model: ir.Model) -> PassResult:
        before = structure_fingerprint(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedFunctionsPass()(model)
        common_passes.RemoveUnusedOpsetsPass()(model)
        return PassResult(model, structure_fingerprint(model) != before)

    def explain(self, model: ir.Model) -> list[Candidate]:
        """Every node: removed, or what keeps it alive (found by running on a copy)."""
        removed = set(removed_nodes(model, self(model.clone()).model))
        lines = []
        for node in model.graph:
            if node in removed:
                lines.append(Candidate(node_label(node), node.op_type, True))
            else:
                lines.append(
                    Candidate(node_label(node), node.op_type, False, _why_live(node, removed))
                )
        return lines


def _why_live(node: ir.Node, removed: set[ir.Node]) -> str:
    for value in node.outputs:
        if value.is_graph_output():
            return f"output '{value.name}' is a graph output"
    for value in node.outputs:
        for reader in value.consumers():
            if reader not in removed:
                return f"output '{value.name}' is read by {describe_node(reader)}"
    return "a subgraph or function still refers to it"
