"""fold-constants: evaluate, at compile time, every node whose inputs are all constants."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnxscript.optimizer

from detc.compiler.frontend.legalize import constants_as_value_tensors
from detc.compiler.ir.pass_base import Candidate, DetcPass, PassResult, node_label
from detc.passes._graph_facts import (
    constant_array,
    describe_source,
    is_onnx_op,
    removed_nodes,
    structure_fingerprint,
)

# onnxscript 0.7.2's defaults (optimizer/_constant_folding.py); restated so `detc passes` shows them
_ONNXSCRIPT_OUTPUT_SIZE_LIMIT = 512 * 512
_ONNXSCRIPT_INPUT_SIZE_LIMIT = 8192


@dataclass(frozen=True)
class FoldConstantsOptions:
    #: folded tensors with more elements than this stay computed nodes, unless folding removes at
    #: least as many constant elements as it adds (e.g. a Transpose of a weight read only there)
    size_limit: int = _ONNXSCRIPT_OUTPUT_SIZE_LIMIT
    #: a node reading a constant with more elements than this is left alone (Transpose excepted)
    input_size_limit: int = _ONNXSCRIPT_INPUT_SIZE_LIMIT
    #: run ONNX shape inference node by node, so that Shape/Size of intermediate values fold
    shape_inference: bool = True

    def __post_init__(self) -> None:
        if self.size_limit < 0 or self.input_size_limit < 0:
            raise ValueError("size limits must be >= 0")


class FoldConstantsPass(DetcPass):
    """Evaluate at compile time every node whose inputs are all constants (onnxscript's folder).

    A thin wrapper over ``onnxscript.optimizer.fold_constants``: the folder also forwards
    Identity-like values and folds Shape/Size of statically shaped values (graph inputs too).
    Other nodes reading a graph input are never folded, nor are random or control-flow nodes,
    ConstantOfShape or (De)QuantizeLinear. Exact: each node is evaluated once, at compile time,
    by onnx's numpy reference implementation instead of at run time. Constants it creates are
    ``Constant(value=tensor)`` at every opset. Dead nodes left behind
    (Constant nodes whose reader folded) are for eliminate-dead-code.
    """

    name = "fold-constants"
    exact = True
    Options = FoldConstantsOptions

    def call(self, model: ir.Model) -> PassResult:
        before = structure_fingerprint(model)
        options: FoldConstantsOptions = self.options
        onnxscript.optimizer.fold_constants(
            model,
            onnx_shape_inference=options.shape_inference,
            input_size_limit=options.input_size_limit,
            output_size_limit=options.size_limit,
        )
        # The folder writes small results as Constant(value_ints=...): invalid ONNX before opset
        # 12 and unread by TVM's importer. detc's graphs carry every constant as a tensor.
        constants_as_value_tensors(model)
        # the folder reports "modified" after renaming values even when no node changed
        return PassResult(model, structure_fingerprint(model) != before)

    def explain(self, model: ir.Model) -> list[Candidate]:
        """Nodes that read at least one constant: folded, or why not (found by folding a copy)."""
        removed = set(removed_nodes(model, self(model.clone()).model))

        def is_constant(value: ir.Value | None) -> bool:
            if value is None:
                return False
            producer = value.producer()
            return constant_array(value) is not None or producer in removed

        options: FoldConstantsOptions = self.options
        lines = []
        for node in model.graph:
            if is_onnx_op(node, "Constant"):
                continue
            if node in removed:
                lines.append(Candidate(node_label(node), node.op_type, True))
                continue
            inputs = [v for v in node.inputs if v is not None]
            if not any(is_constant(v) for v in inputs):
                continue  # nothing constant to fold here
            runtime = next((v for v in inputs if not is_constant(v)), None)
            if runtime is not None:
                reason = f"input '{runtime.name}' comes from {describe_source(runtime)}"
            else:
                reason = (
                    "all inputs are constant but the folder kept it (size_limit="
                    f"{options.size_limit}, input_size_limit={options.input_size_limit}; "
                    "random, control-flow, ConstantOfShape and (De)QuantizeLinear never fold)"
                )
            lines.append(Candidate(node_label(node), node.op_type, False, reason))
        return lines
