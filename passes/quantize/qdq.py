"""Which layers int8 quantization can take, and the QDQ graph onnxruntime.quantization writes
for a chosen set of them from calibrated ranges."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.ir.pass_base import node_label
from detc.compiler.reference import to_proto
from detc.passes._graph_facts import ONNX_DOMAINS, constant_array, describe_node, fresh_name
from detc.passes.calibration import static_facts
from detc.passes.quantize.ranges import quiet_onnxruntime

#: op types whose second input is a weight quantized per output channel
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm")


@dataclass(frozen=True)
class QuantLayer:
    """A node the int8 quantization would quantize, with its cost."""

    name: str
    op_type: str
    macs: int


def quantizable_layers(
    model: ir.Model, op_types: Sequence[str], excluded: Iterable[str] = ()
) -> tuple[list[QuantLayer], list[tuple[str, str, str]]]:
    """Layers of ``op_types`` that can be quantized, and ``(name, op_type, reason)`` of the rest.

    Pure: reads ``model`` only (unnamed nodes are listed under :func:`node_label`).
    """
    _, macs = static_facts(model)
    skip = set(excluded)
    layers: list[QuantLayer] = []
    rejected: list[tuple[str, str, str]] = []
    for node in model.graph:
        if node.op_type not in op_types or node.domain not in ONNX_DOMAINS:
            continue
        label = node_label(node)
        reason = _why_not_quantizable(node, skip)
        if reason:
            rejected.append((label, node.op_type, reason))
        else:
            layers.append(QuantLayer(label, node.op_type, macs.get(node, 0)))
    return layers, rejected


def _why_not_quantizable(node: ir.Node, excluded: set[str]) -> str:
    label = describe_node(node)
    if node.name in excluded:
        return f"{label} is excluded (option exclude)"
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            return f"{label} already reads a DequantizeLinear (the model is quantized)"
    data = node.inputs[0] if node.inputs else None
    if data is None or data.dtype not in (ir.DataType.FLOAT, None):  # None: inferred later
        return f"{label} input is not float32"
    if node.op_type in _WEIGHTED_OPS:
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.dtype != np.float32:
            return f"{label} has no constant float32 weight"
    return ""


def name_unnamed_nodes(graph: ir.Graph) -> int:
    """Give every unnamed node ``<op_type>_<index>``: onnxruntime selects nodes by name."""
    taken = {node.name for node in graph if node.name}
    named = 0
    for index, node in enumerate(graph):
        if not node.name:
            node.name = fresh_name(graph, f"{node.op_type}_{index}", taken)
            named += 1
    return named


@dataclass(frozen=True)
class QdqSettings:
    per_channel: bool = True
    symmetric_activations: bool = False
    quantize_outputs: bool = False


def quantize_qdq(
    model: ir.Model | onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    nodes: Iterable[str],
    settings: QdqSettings = QdqSettings(),
) -> onnx.ModelProto:
    """``model`` with ``nodes`` (names) quantized to int8 QDQ from calibrated ``ranges``.

    onnxruntime's ``quantize_static`` writes the graph; the ranges reach it as its calibration
    cache, so nothing is recomputed. Weights are symmetric int8 (per channel when asked, scale
    ``max|w| / 127``), activations uint8 with a zero point or symmetric int8.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        TensorData,
        TensorsData,
        quantize_static,
        save_tensors_data,
    )

    proto = to_proto(model)
    chosen = list(dict.fromkeys(nodes))
    if not chosen:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        return copy
    op_types = sorted({n.op_type for n in proto.graph.node if n.name in set(chosen)})
    table = TensorsData(
        CalibrationMethod.MinMax,
        {
            name: TensorData(
                lowest=np.array(low, dtype=np.float32), highest=np.array(high, dtype=np.float32)
            )
            for name, (low, high) in ranges.items()
        },
    )
    activation = QuantType.QInt8 if settings.symmetric_activations else QuantType.QUInt8
    extra = {
        "WeightSymmetric": True,
        "ActivationSymmetric": settings.symmetric_activations,
        "OpTypesToExcludeOutputQuantization": [] if settings.quantize_outputs else op_types,
    }
    with tempfile.TemporaryDirectory(prefix="detc-qdq-") as tmp, quiet_onnxruntime():
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(table, cache)
        out = Path(tmp) / "quantized.onnx"
        quantize_static(
            proto,
            out,
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=settings.per_channel,
            reduce_range=False,
            activation_type=activation,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=chosen,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=cache,
            extra_options=extra,
        )
        return onnx.load(out)


#: ops whose first two inputs are the activation and the weight: quantized when both are
_ACTIVATION_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def quantized_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes of a QDQ model that compute in int8: a Conv/Gemm/MatMul whose
    activation and weight both come from a DequantizeLinear, any other node whose inputs all do.

    Reading *a* dequantized input is not enough: a tensor read by an int8 layer and a float one
    (the two branches of a C3 block) has one Q/DQ pair that both read, the float layer through
    the DequantizeLinear with its float weight.
    """
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}

    def int8(node: onnx.NodeProto) -> bool:
        inputs = [i for i in node.input if i]
        if node.op_type in _ACTIVATION_WEIGHT_OPS:
            inputs = list(node.input[:2])
        return bool(inputs) and all(i in dequantized for i in inputs)

    return {
        n.name
        for n in model.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and int8(n)
    }
