"""Export idioms real ONNX files carry, rewritten into the one form detc's passes and TVM read.

Each rewrite is exact (the model computes the same thing) and needed because some consumer
downstream reads only one spelling:

* **initializers also listed as graph inputs** (older PyTorch exports, Paddle2ONNX): an input with
  an initializer of the same name is a constant with an overridable default. detc compiles for
  the default, so the input is dropped; TVM's importer otherwise fails ("used before its
  definition").
* **``Constant`` with ``value_int(s)`` / ``value_float(s)``**: TVM's importer reads only ``value``,
  and at opset 11 those attributes do not exist (the checker rejects them).
* **``Resize`` with an empty ``scales`` beside ``sizes``** (PyTorch's opset-11
  ``interpolate(size=...)``): the ONNX spec treats an empty input as absent; TVM refuses both.
  Inputs of Resize may be absent only from opset 13 on, so such a model is first converted to
  opset 13 (exact: :func:`needs_optional_resize_inputs`).
* **``ConstantOfShape`` of a small constant shape** (PyTorch's ``F.pad`` computes its ``pads``
  through one): the constant folder never folds ConstantOfShape, so the pads stayed computed and
  TVM refused them ("Dynamic pads are not supported"). Up to :data:`CONSTANT_OF_SHAPE_LIMIT`
  elements it becomes a ``Constant``.

:func:`check_attributes` refuses attribute values that ONNX shape inference and onnxruntime
reject and that TVM would index out of bounds with (negative dilations, pads, strides).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from detc.compiler.errors import BadInputError

_SCALAR_CONSTANT_ATTRIBUTES = {
    "value_int": np.int64,
    "value_ints": np.int64,
    "value_float": np.float32,
    "value_floats": np.float32,
}

#: ConstantOfShape outputs up to this many elements become Constants (pads, small shape tensors)
CONSTANT_OF_SHAPE_LIMIT = 1024

#: ops whose spatial attributes index into the input's dimensions
_WINDOW_OPS = frozenset(
    {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"}
)


def _all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if isinstance(attr.value, ir.Graph):
                yield from _all_nodes(attr.value)


def drop_initializer_inputs(model: ir.Model) -> list[str]:
    """Graph inputs that are also initializers become plain constants; returns their names."""
    graph = model.graph
    dropped = [v for v in graph.inputs if v.name is not None and v.name in graph.initializers]
    for value in dropped:
        graph.inputs.remove(value)
    return [str(value.name) for value in dropped]


def constants_as_value_tensors(model: ir.Model) -> int:
    """``Constant(value_ints=...)`` and friends → ``Constant(value=tensor)``; returns how many."""
    rewritten = 0
    for node in _all_nodes(model.graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for name, dtype in _SCALAR_CONSTANT_ATTRIBUTES.items():
            attr = node.attributes.get(name)
            if attr is None:
                continue
            array = np.asarray(attr.value, dtype=dtype)
            del node.attributes[name]
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
            rewritten += 1
    return rewritten


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or of a ``Constant(value=...)`` node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.op_type != "Constant":
        return None
    attr = producer.attributes.get("value")
    if attr is None or not isinstance(attr.value, ir.TensorProtocol):
        return None
    return attr.value.numpy()


def _is_empty_constant(value: ir.Value | None) -> bool:
    array = _constant(value)
    return array is not None and array.size == 0


def _empty_resize_inputs(model: ir.Model) -> Iterator[tuple[ir.Node, int]]:
    for node in _all_nodes(model.graph):
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        for index in (1, 2):
            if index < len(node.inputs) and _is_empty_constant(node.inputs[index]):
                yield node, index


def needs_optional_resize_inputs(model: ir.Model) -> bool:
    """Whether the model has empty Resize inputs at an opset where they cannot be absent (< 13)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    return opset < 13 and next(_empty_resize_inputs(model), None) is not None


def empty_resize_inputs_as_absent(model: ir.Model) -> int:
    """An empty ``roi`` or ``scales`` of ``Resize`` becomes an absent input; returns how many.

    Only at opset >= 13 (before, they are required inputs and stay as they are).
    """
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < 13:
        return 0
    found = list(_empty_resize_inputs(model))
    for node, index in found:
        node.replace_input_with(index, None)
    return len(found)


def small_constant_of_shape_as_constants(model: ir.Model) -> int:
    """``ConstantOfShape`` of a constant shape, small enough, → ``Constant``; returns how many."""
    rewritten = 0
    for node in _all_nodes(model.graph):
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            continue
        shape = _constant(node.inputs[0] if node.inputs else None)
        if shape is None or shape.ndim != 1:
            continue
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) > CONSTANT_OF_SHAPE_LIMIT:
            continue
        attr = node.attributes.get("value")
        # ONNX's default fill is a float32 zero
        fill = (
            attr.value.numpy().reshape(-1)
            if attr is not None and isinstance(attr.value, ir.TensorProtocol)
            else np.zeros(1, dtype=np.float32)
        )
        # Rewritten in place: the output keeps its name, type and every use.
        node.resize_inputs(0)
        node.op_type = "Constant"
        node.attributes.clear()
        node.attributes["value"] = ir.AttrTensor(
            "value", ir.tensor(np.full(dims, fill[0], dtype=fill.dtype))
        )
        rewritten += 1
    return rewritten


def legalize(model: ir.Model) -> None:
    """Every rewrite above, in place."""
    drop_initializer_inputs(model)
    constants_as_value_tensors(model)
    small_constant_of_shape_as_constants(model)
    empty_resize_inputs_as_absent(model)


def check_attributes(model: ir.Model, path: str) -> None:
    """Refuse window attributes no runtime accepts, naming the node: exit 2, not a crash later."""
    for node in _all_nodes(model.graph):
        if node.op_type not in _WINDOW_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for name, lowest in (("dilations", 1), ("strides", 1), ("kernel_shape", 1), ("pads", 0)):
            attr = node.attributes.get(name)
            if attr is None:
                continue
            values = list(attr.value)
            if any(v < lowest for v in values):
                raise BadInputError(
                    f"{path}: node '{node.name}' ({node.op_type}) has {name}={values}; each must "
                    f"be >= {lowest} (ONNX shape inference and onnxruntime refuse it too)"
                )
        group = node.attributes.get("group")
        if group is not None and group.value < 1:
            raise BadInputError(
                f"{path}: node '{node.name}' ({node.op_type}) has group={group.value}; it must "
                "be >= 1"
            )


def _static_size(shape: ir.Shape | None) -> int | None:
    if shape is None:
        return None
    dims = [d for d in shape.dims if isinstance(d, int)]
    if len(dims) != len(shape.dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def check_reshapes_follow(model: ir.Model, path: str) -> None:
    """After new input shapes: a Reshape to a constant shape must still hold its element count.

    Shape inference takes a constant target shape as it is, so a graph exported with sizes baked
    in (a YOLO head reshaping to 80x80 cells) passes inference at another input size and fails
    only at run time; this names the node instead.
    """
    for node in _all_nodes(model.graph):
        if node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        target = _constant(node.inputs[1])
        if target is None:
            continue
        dims = [int(d) for d in target.reshape(-1)]
        if any(d <= 0 for d in dims):
            continue  # 0 copies and -1 infers a dimension: such a Reshape follows its input
        size = _static_size(node.inputs[0].shape)
        wanted = int(np.prod(dims, dtype=np.int64))
        if size is not None and size != wanted:
            raise BadInputError(
                f"{path}: node '{node.name}' (Reshape) reshapes {size:,} elements to the fixed "
                f"shape {dims}: the graph's shapes do not follow the new --input-shape; export "
                "the model at that size"
            )
