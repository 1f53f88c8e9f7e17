"""Questions the built-in passes ask of an ``onnx_ir`` graph, and the few edits they share.

Shared by the built-in passes so that their ``NoMatch`` reasons name nodes and values the same
way, and so that every rewrite keeps graph output names and cleans up after itself alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from detc.compiler.ir.pass_base import node_label

ONNX_DOMAINS = ("", "ai.onnx")


def is_onnx_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ONNX_DOMAINS


def describe_node(node: ir.Node) -> str:
    """``Relu 'r1'``: how reasons name a node."""
    return f"{node.op_type} '{node_label(node)}'"


def describe_source(value: ir.Value) -> str:
    """Where a value comes from, for reasons: ``Relu 'r1'``, ``graph input 'x'``, ..."""
    producer = value.producer()
    if producer is not None:
        return describe_node(producer)
    if value.is_graph_input():
        return f"graph input '{value.name}'"
    if value.is_initializer():
        return f"initializer '{value.name}'"
    return f"outer-scope value '{value.name}'"


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's tensor when it is fixed at compile time, else None.

    An initializer that is also a graph input is *not* constant: a caller may override it.
    """
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node; not ours to diagnose here
        return None
    if tensor is None:
        return None
    return tensor.numpy()


def is_constant(value: ir.Value) -> bool:
    """Whether ``value`` is an initializer (not also a graph input) or a Constant node's output."""
    if value.is_graph_input():
        return False
    if value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", None)


def consumers_besides(value: ir.Value, node: ir.Node) -> list[ir.Node]:
    """Nodes other than ``node`` that read ``value`` (each listed once)."""
    seen: dict[int, ir.Node] = {}
    for user, _ in value.uses():
        if user is not node:
            seen.setdefault(id(user), user)
    return list(seen.values())


def exclusive_use_reason(value: ir.Value, producer: ir.Node, consumer: ir.Node) -> str | None:
    """Why ``value`` (output of ``producer``) is not read by ``consumer`` alone; None if it is."""
    if value.is_graph_output():
        return f"{describe_node(producer)} output '{value.name}' is also a graph output"
    others = consumers_besides(value, consumer)
    if others:
        names = ", ".join(f"'{node_label(n)}'" for n in others[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        return f"{describe_node(producer)} output also feeds {names}{more}"
    if len(value.uses()) > 1:
        return f"{describe_node(consumer)} reads {describe_node(producer)} output more than once"
    return None


def taken_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name}
    names.update(name for name in graph.initializers if name)
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def fresh_name(graph: ir.Graph, base: str, taken: set[str] | None = None) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever no value of ``graph`` is named yet."""
    taken = taken if taken is not None else taken_names(graph)
    candidate, counter = base, 0
    while candidate in taken:
        counter += 1
        candidate = f"{base}_{counter}"
    taken.add(candidate)
    return candidate


def add_initializer(graph: ir.Graph, base_name: str, array: np.ndarray) -> ir.Value:
    name = fresh_name(graph, base_name)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def set_constant_input(
    graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, base: str
) -> None:
    """Make input ``index`` of ``node`` the constant ``array``.

    An initializer read by ``node`` alone is updated in place, keeping its name; a shared one,
    a Constant node's output or an absent input gets a new initializer so other readers keep
    the old tensor.
    """
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    old = node.inputs[index]
    if (
        old is not None
        and old.is_initializer()
        and not old.is_graph_input()
        and not old.is_graph_output()
        and len(old.uses()) == 1
        and old.name
    ):
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    node.replace_input_with(index, add_initializer(graph, base, array))
    if old is not None:
        drop_if_unused(graph, [old])


def drop_if_unused(graph: ir.Graph, values: Iterable[ir.Value | None]) -> None:
    """Remove initializers and Constant nodes among ``values`` that nothing reads any more."""
    for value in values:
        if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        producer = value.producer()
        if value.is_initializer() and value.name is not None and value.name in graph.initializers:
            del graph.initializers[value.name]
        elif is_onnx_op(producer, "Constant") and producer is not None and producer.graph is graph:
            graph.remove(producer, safe=True)


def forward_value(graph: ir.Graph, node: ir.Node, kept: ir.Value, dropped: ir.Value) -> None:
    """Remove ``node``, whose output ``dropped`` equals ``kept``; its readers get ``kept``.

    When ``dropped`` is a graph output, ``kept`` takes its name, so the model's interface does not
    change. Callers make sure ``kept`` is not a graph input, initializer or graph output then.
    """
    output_name = dropped.name
    was_graph_output = dropped.is_graph_output()
    # a graph output must carry a type; intermediate values often have none recorded
    if kept.type is None:
        kept.type = dropped.type
    if kept.shape is None:
        kept.shape = dropped.shape
    ir.convenience.replace_all_uses_with(dropped, kept, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if was_graph_output:
        # onnx_ir does not enforce unique names: free the name before reusing it
        dropped.name = None
        kept.name = output_name


def structure_fingerprint(model: ir.Model) -> tuple[object, ...]:
    """A cheap summary that changes whenever a pass adds, removes or rewires anything.

    For wrapped third-party passes whose own ``modified`` flag is not reliable (onnx-ir's
    RemoveUnusedNodesPass trims unused optional outputs without reporting it).
    """
    graph = model.graph
    # objects, not id()s: identity comparison, and they stay alive so no id can be recycled
    nodes = tuple(
        (
            node,
            node.op_type,
            tuple(node.inputs),
            tuple(v.name for v in node.outputs),
            tuple(node.attributes),
        )
        for node in ir.traversal.RecursiveGraphIterator(graph)
    )
    return (
        nodes,
        tuple(graph.inputs),
        tuple((v, v.name) for v in graph.outputs),
        tuple((name, v.const_value) for name, v in graph.initializers.items()),
        tuple(sorted(model.opset_imports.items())),
        tuple(model.functions),
    )


def removed_nodes(before: ir.Model, after: ir.Model) -> list[ir.Node]:
    """Nodes of ``before``'s main graph with no counterpart in ``after`` (by op, name, output)."""

    def key(node: ir.Node) -> tuple[str, str, str]:
        first = node.outputs[0].name if node.outputs else ""
        return (node.op_type, node.name or "", first or "")

    kept = {key(node) for node in after.graph}
    return [node for node in before.graph if key(node) not in kept]
