"""float16 conversion (``quantize{mode=fp16}``): float32 weights become float16, and every op
onnxruntime's CPU provider has a float16 kernel for computes in float16 (asked of onnxruntime
itself); graph inputs and outputs stay float32 behind Casts."""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pass_base import node_label
from detc.passes._graph_facts import ONNX_DOMAINS, fresh_name, is_constant

logger = logging.getLogger(__name__)

FP16_POLICIES = ("onnxruntime", "all")


_F32 = ir.DataType.FLOAT
_F16 = ir.DataType.FLOAT16


@dataclass(frozen=True)
class _Slot:
    """What an op's input or output position accepts: a type variable allowing float16 or not."""

    convertible: bool  # a type variable whose allowed types include float16
    fixed: bool  # a fixed type such as tensor(float): never converted


def _slots(node: ir.Node, opset: int) -> tuple[list[_Slot], list[_Slot]] | None:
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def slot(params: Sequence[Any], index: int) -> _Slot:
        if not params:
            return _Slot(False, True)
        formal = params[min(index, len(params) - 1)]
        kinds = allowed.get(formal.type_str)
        if kinds is None:
            return _Slot(False, True)
        return _Slot("tensor(float16)" in kinds, False)

    inputs = [slot(schema.inputs, i) for i in range(len(node.inputs))]
    outputs = [slot(schema.outputs, i) for i in range(len(node.outputs))]
    # an output typed by an attribute (Cast's `to`, ConstantOfShape's value) is a boundary
    input_vars = {p.type_str for p in schema.inputs}
    for index, formal in enumerate(schema.outputs[: len(node.outputs)]):
        if formal.type_str not in input_vars and outputs[index].convertible:
            return None
    return inputs, outputs


def _is_f32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == _F32


@functools.cache
def _onnxruntime_has_kernel(
    domain: str,
    op_type: str,
    opset: int,
    inputs: tuple[int, ...],
    outputs: tuple[int, ...],
    attributes: bytes,
) -> bool:
    """Whether onnxruntime's CPU provider runs this op natively with these (ONNX) dtypes.

    Without a kernel for a float16 node, onnxruntime inserts Casts to float32 around it when
    the session is created; the graph it saves shows them.
    """
    import onnxruntime as ort

    node = onnx.NodeProto()
    node.ParseFromString(attributes)
    node.op_type, node.domain = op_type, domain
    del node.input[:]
    del node.output[:]
    node.input.extend(f"in{i}" if t else "" for i, t in enumerate(inputs))
    node.output.extend(f"out{i}" for i in range(len(outputs)))
    graph = onnx.helper.make_graph(
        [node],
        "probe",
        [onnx.helper.make_tensor_value_info(f"in{i}", t, None) for i, t in enumerate(inputs) if t],
        [onnx.helper.make_tensor_value_info(f"out{i}", t, None) for i, t in enumerate(outputs)],
    )
    probe = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(domain, opset)], ir_version=8
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="detc-fp16-probe-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "seen.onnx")
        try:
            ort.InferenceSession(
                probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            seen = onnx.load(options.optimized_model_filepath)
        except Exception:  # onnxruntime refuses the op in this form: keep it in float32
            return False
    return [n.op_type for n in seen.graph.node] == [op_type]


@dataclass
class Float16Report:
    converted: list[str] = field(default_factory=list)  # nodes computing in float16
    kept: dict[str, str] = field(default_factory=dict)  # node -> why it stays float32
    weights: int = 0  # initializers / Constants stored in float16
    casts: int = 0

    def table(self) -> str:
        by_reason: dict[str, int] = {}
        for reason in self.kept.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        lines = [
            f"quantize fp16: {len(self.converted)} nodes compute in float16, {len(self.kept)} "
            f"stay float32; {self.weights} weights stored float16; {self.casts} Casts inserted"
        ]
        for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  kept float32 ({count}): {reason}")
        return "\n".join(lines)


def convert_float16(
    model: ir.Model, *, keep: Iterable[str] = (), policy: str = "onnxruntime"
) -> Float16Report:
    """Convert ``model`` to float16 in place; graph inputs and outputs keep their names and dtypes.

    A node computes in float16 when ONNX allows it (its float32 positions are type variables
    admitting float16), it is not in ``keep``, and (policy ``onnxruntime``) onnxruntime's CPU
    provider has a float16 kernel for it and it either reads a constant weight or a float16
    activation — so that data-movement ops between float32 ops do not bounce through Casts.
    Float32 constants read only where float16 is allowed are stored in float16 (weights too
    when their op stays float32: it then reads them through a Cast onnxruntime folds).
    """
    if policy not in FP16_POLICIES:
        raise BadInputError(f"fp16_policy={policy!r}: choose {', '.join(FP16_POLICIES)}")
    import onnx_ir.passes.common as common_passes

    # dtypes of intermediate values decide where Casts go: make sure they are all known
    common_passes.ShapeInferencePass()(model)
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    skip = set(keep)
    report = Float16Report()
    slots: dict[ir.Node, tuple[list[_Slot], list[_Slot]]] = {}
    half: set[ir.Node] = set()  # nodes computing in float16
    dtype: dict[ir.Value, ir.DataType] = {}  # float32 values and the dtype each will have

    def constant_dtype(value: ir.Value) -> ir.DataType:
        uses = value.uses()
        ok = bool(uses) and all(
            user in slots and slots[user][0][index].convertible and user.name not in skip
            for user, index in uses
        )
        return _F16 if ok and not value.is_graph_output() else _F32

    for node in graph:
        found = _slots(node, opset) if node.domain in ONNX_DOMAINS else None
        if found is not None:
            slots[node] = found
    for node in graph:
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            continue
        if not any(_is_f32(v) for v in [*node.inputs, *node.outputs]):
            continue
        label = node_label(node)
        reason = _why_float32(node, slots.get(node), skip, dtype, policy, opset)
        if reason:
            report.kept[label] = reason
        else:
            half.add(node)
            report.converted.append(label)
        for index, value in enumerate(node.outputs):
            if _is_f32(value):
                convertible = node in half and slots[node][1][index].convertible
                dtype[value] = _F16 if convertible else _F32
        for source in node.inputs:
            if source is not None and _is_f32(source) and source not in dtype:
                dtype[source] = constant_dtype(source) if is_constant(source) else _F32
    _apply_float16(graph, slots, half, dtype, report)
    logger.info("%s", report.table())
    return report


def _why_float32(
    node: ir.Node,
    found: tuple[list[_Slot], list[_Slot]] | None,
    keep: set[str],
    dtype: dict[ir.Value, ir.DataType],
    policy: str,
    opset: int,
) -> str:
    if node.name in keep:
        return "excluded (option exclude)"
    if any(v is not None and v.dtype is None for v in node.outputs):
        return "an output has no known type (shape inference could not tell)"
    if found is None:
        return "no ONNX schema allows it in float16 (custom op, or output typed by an attribute)"
    if any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    ):
        return "has subgraphs"
    inputs, outputs = found
    pairs = [*zip(node.inputs, inputs, strict=True), *zip(node.outputs, outputs, strict=True)]
    for value, slot in pairs:
        if _is_f32(value) and not slot.convertible and not slot.fixed:
            return "its float32 type variable does not admit float16"
    if policy == "all":
        return ""
    reads_half = any(
        v is not None and dtype.get(v) == _F16 and not is_constant(v) for v in node.inputs
    )
    reads_weight = any(
        _is_f32(v) and v is not None and is_constant(v) and inputs[i].convertible
        for i, v in enumerate(node.inputs)
    )
    if not (reads_half or reads_weight):
        return "reads only float32 activations (converting would only add Casts)"
    in_types = tuple(
        0
        if v is None
        else ((_F16 if _is_f32(v) and inputs[i].convertible else v.dtype or _F32).value)
        for i, v in enumerate(node.inputs)
    )
    out_types = tuple(
        (_F16 if _is_f32(v) and outputs[i].convertible else v.dtype or _F32).value
        for i, v in enumerate(node.outputs)
    )
    attributes = onnx.NodeProto()
    for attribute in node.attributes.values():
        attributes.attribute.append(ir.serde.serialize_attribute(attribute))
    if not _onnxruntime_has_kernel(
        node.domain or "",
        node.op_type,
        opset,
        in_types,
        out_types,
        attributes.SerializeToString(),
    ):
        return "onnxruntime's CPU provider has no float16 kernel for it"
    return ""


def _apply_float16(
    graph: ir.Graph,
    slots: dict[ir.Node, tuple[list[_Slot], list[_Slot]]],
    half: set[ir.Node],
    dtype: dict[ir.Value, ir.DataType],
    report: Float16Report,
) -> None:
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    new_nodes: list[ir.Node] = []

    def cast(value: ir.Value, to: ir.DataType) -> ir.Value:
        key = (value, to)
        if key not in casts:
            suffix = "fp16" if to == _F16 else "fp32"
            node = ir.node(
                "Cast", [value], attributes={"to": to}, name=f"{value.name}/cast_{suffix}"
            )
            out = node.outputs[0]
            out.name = f"{value.name}_{suffix}"
            out.dtype, out.shape = to, value.shape
            new_nodes.append(node)
            casts[key] = out
        return casts[key]

    for value, target in dtype.items():
        if target != _F16:
            continue
        producer = value.producer()
        if value.is_initializer() and value.const_value is not None:
            array = value.const_value.numpy().astype(np.float16)
            value.const_value = ir.tensor(array, name=value.name)
            report.weights += 1
        elif producer is not None and producer.op_type == "Constant":
            attribute = producer.attributes.get("value")
            if attribute is None:  # value_float(s): no tensor to convert; keep float32
                dtype[value] = _F32
                continue
            tensor = attribute.as_tensor()
            array = tensor.numpy().astype(np.float16)
            producer.attributes["value"] = ir.AttrTensor(
                "value", ir.tensor(array, name=tensor.name)
            )
            report.weights += 1
        value.dtype = _F16

    for node in list(graph):
        if node not in slots:
            wanted_half: list[bool] = [False] * len(node.inputs)
        else:
            inputs = slots[node][0]
            wanted_half = [node in half and s.convertible for s in inputs]
        for index, source in enumerate(node.inputs):
            if source is None or source not in dtype:
                continue
            want = _F16 if wanted_half[index] else _F32
            if source.dtype != want:
                node.replace_input_with(index, cast(source, want))

    taken: set[str] = set()
    for index, value in enumerate(list(graph.outputs)):
        if value.dtype != _F16:
            continue
        name = value.name
        value.name = fresh_name(graph, f"{name}_fp16", taken)
        restored = ir.node("Cast", [value], attributes={"to": _F32}, name=f"{name}/cast_fp32")
        out = restored.outputs[0]
        out.name, out.dtype, out.shape = name, _F32, value.shape
        new_nodes.append(restored)
        graph.outputs[index] = out
    graph.extend(new_nodes)
    graph.sort()
    report.casts = len(new_nodes)
