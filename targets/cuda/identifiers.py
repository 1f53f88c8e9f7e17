"""Graph input and weight names that are C identifiers.

TVM's CUDA code generator names each kernel argument after the tensor it receives, and for a
graph input or a weight that is the ONNX name: ``float* /stem/conv/Conv_bias_ptr`` (names the
passes and exporters write, e.g. "/stem/conv/Conv_bias_folded", "input.1") is not C and nvcc
refuses it. The artifact passes inputs and weights by position, so renaming them in the copy
TVM imports changes nothing a user sees.
"""

from __future__ import annotations

import re

import onnx

_NOT_IDENTIFIER = re.compile(r"\W")


def _identifier(name: str, taken: set[str]) -> str:
    base = _NOT_IDENTIFIER.sub("_", name) or "v"
    if base[0].isdigit():
        base = f"v_{base}"
    chosen, suffix = base, 1
    while chosen in taken:
        chosen, suffix = f"{base}_{suffix}", suffix + 1
    taken.add(chosen)
    return chosen


def _rename_uses(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _rename_uses(subgraph, renamed)  # a subgraph may read the outer weights


def with_c_identifiers(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when every graph input and initializer name is a C identifier, else a
    copy with those renamed (graph outputs keep their names)."""
    graph = model.graph
    names = [value.name for value in graph.input] + [init.name for init in graph.initializer]
    if all(name.isidentifier() for name in names):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    outputs = {value.name for value in graph.output}
    taken = {name for name in names if name.isidentifier()} | outputs
    renamed = {
        name: _identifier(name, taken)
        for name in dict.fromkeys(names)
        if not name.isidentifier() and name not in outputs
    }
    for value in [*graph.input, *graph.value_info]:
        value.name = renamed.get(value.name, value.name)
    for init in graph.initializer:
        init.name = renamed.get(init.name, init.name)
    _rename_uses(graph, renamed)
    return copy
