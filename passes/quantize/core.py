"""quantize: int8 post-training static quantization as QDQ ONNX, or float16 (approximate).

**int8** (``mode=int8``). The result is an ordinary ONNX graph in QDQ form that onnxruntime runs
as a second reference, and that an int8 back end lowers by matching each quantized layer::

    x' = DequantizeLinear(QuantizeLinear(x, s_x, z_x), s_x, z_x)   per tensor
    w' = DequantizeLinear(w_q, s_w, 0)        int8, per output channel (Conv: axis 0)
    b' = DequantizeLinear(b_q, s_x * s_w, 0)  int32
    y  = Conv(x', w', b')                     y stays float unless quantize_outputs=true

Activations are uint8 with a zero point (what x86's u8 x s8 dot products, VNNI, want), or int8
with zero point 0 (``activations=symmetric``). Weights are symmetric: ``s_w[n] = max|w[n]| /
127``. Conv outputs stay float by default: quantizing them as well (onnxruntime's QLinearConv
form) cost yolov5n 1.5 mAP points on coco64.

The heavy lifting is onnxruntime.quantization's: ``create_calibrator`` collects activation
statistics from calibration images (one image per ``collect_data`` call, so no more than one
image's activations are held), and ``quantize_static(..., QuantFormat.QDQ)`` writes the graph
from those ranges, handed to it as its calibration cache, so that any subset of layers can be
quantized again without recalibrating (:meth:`CalibratedModel.quantize`, used by the
sensitivity analysis and mixed precision in :mod:`detc.passes.quantize.mixed_precision`).
Ranges come from ``minmax``, ``percentile`` or ``entropy`` (onnxruntime's algorithms; KL with 2048
histogram bins and the levels an 8-bit grid really has, see :func:`_window_levels`), or
``mse``: the clipping range whose 8-bit grid has the least expected squared rounding plus
clipping error, searched on onnxruntime's histograms.

``max_map_drop`` starts from the fully quantized model and keeps the layers whose quantization
hurts most in float until the measured COCO mAP drop fits the budget
(:func:`detc.passes.quantize.mixed_precision.mixed_precision`).

**float16** (``mode=fp16``). Float32 weights become float16 and every op that onnxruntime's CPU
provider has a float16 kernel for computes in float16; graph inputs and outputs stay float32
(Casts at the edges). Ops without such a kernel stay float32 behind Casts: which ones is asked
of onnxruntime itself, by building each op alone in float16 and seeing whether onnxruntime
inserts Casts around it. ``fp16_policy=all`` converts every op ONNX allows in float16, for
targets that compute in it (onnxruntime then inserts its own Casts).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pass_base import Candidate, DetcPass, PassResult, node_label
from detc.compiler.reference import to_proto
from detc.passes._graph_facts import ONNX_DOMAINS, constant_array, describe_node, fresh_name
from detc.passes.calibration import Feeds, calibration_feeds, static_facts

logger = logging.getLogger(__name__)

MODES = ("int8", "fp16")
METHODS = ("minmax", "percentile", "entropy", "mse")
ACTIVATIONS = ("asymmetric", "symmetric")
FP16_POLICIES = ("onnxruntime", "all")
RANK_BY = ("sqnr", "map")
#: op types whose second input is a weight quantized per output channel
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm")
#: levels of an 8-bit grid: KL compares the histogram with its quantized copy at this many levels
_LEVELS = 256
_MSE_CANDIDATES = 200
_MSE_POINTS_PER_BIN = 8
_MIN_QDQ_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear (axis attribute)


def _option(default: Any, help: str) -> Any:
    """A dataclass field whose ``metadata["help"]`` documents it."""
    return field(default=default, metadata={"help": help})


def split_names(text: str) -> tuple[str, ...]:
    """Names written as one option value: separated by ``,`` (inside quotes), ``;`` or ``|``."""
    for separator in ";|":
        text = text.replace(separator, ",")
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of ``quantize`` (pipeline text: ``quantize{calib=DIR,method=entropy}``).

    Each field's ``metadata["help"]`` says what it does (for ``detc passes -v``).
    """

    mode: str = _option("int8", "int8: QDQ int8 (needs calib); fp16: float16 weights and ops")
    calib: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "folder of images (or a COCO dataset folder) to calibrate activation ranges on"
    )
    calib_images: int = _option(32, "how many calibration images to draw (with `seed`)")
    spec: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "preprocessing of the calib images (model spec JSON/TOML); default: inferred"
    )
    method: str = _option(
        "percentile",
        "activation ranges: minmax, percentile, entropy (KL) or mse (least squared error)",
    )
    percentile: float = _option(99.999, "percentile method: share of values kept inside the range")
    bins: int = _option(2048, "histogram bins of the percentile, entropy and mse methods")
    activations: str = _option(
        "asymmetric", "asymmetric: uint8 with a zero point (x86 u8s8); symmetric: int8, zero 0"
    )
    per_channel: bool = _option(True, "weights: one scale per output channel (else per tensor)")
    quantize_outputs: bool = _option(
        False, "also quantize the outputs of quantized ops (onnxruntime's QLinearConv form)"
    )
    ops: str = _option("Conv|Gemm|MatMul", "op types to quantize (separate with | or ;)")
    exclude: str = _option("", "node names kept in float (separate with | or ;)")
    max_map_drop: float | None = _option(
        None, "keep the most sensitive layers in float until mAP drops at most this (points)"
    )
    data: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "COCO dataset max_map_drop measures mAP on (default: calib, if it is one)"
    )
    decoder: str | None = _option(None, "decoder for max_map_drop (default: the model spec's)")
    eval_images: int | None = _option(None, "max_map_drop: images of `data` (default: all)")
    rank_by: str = _option(
        "sqnr", "max_map_drop ranks layers by output SQNR (cheap) or by their own mAP change (map)"
    )
    probe_images: int = _option(8, "calibration images the output SQNR is measured on")
    fp16_policy: str = _option(
        "onnxruntime",
        "fp16: onnxruntime keeps ops without an onnxruntime CPU float16 kernel in float32; all "
        "converts every op (for targets computing in float16)",
    )
    seed: int = _option(0, "seed of every random draw (calibration images)")

    def __post_init__(self) -> None:
        choices = {
            "mode": MODES,
            "method": METHODS,
            "activations": ACTIVATIONS,
            "fp16_policy": FP16_POLICIES,
            "rank_by": RANK_BY,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose {', '.join(allowed)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile} must be in (0, 100]")
        if self.bins < 4 * _LEVELS:
            raise ValueError(f"bins={self.bins} must be at least {4 * _LEVELS}")
        if self.calib_images < 1 or self.probe_images < 1:
            raise ValueError("calib_images and probe_images must be at least 1")
        if self.max_map_drop is not None and self.max_map_drop < 0:
            raise ValueError(f"max_map_drop={self.max_map_drop} must be >= 0 (mAP points)")
        if not self.op_types:
            raise ValueError("ops names no op type")

    @property
    def op_types(self) -> tuple[str, ...]:
        return split_names(self.ops)

    @property
    def excluded(self) -> frozenset[str]:
        return frozenset(split_names(self.exclude))

    @property
    def symmetric_activations(self) -> bool:
        return self.activations == "symmetric"


# --- which layers -----------------------------------------------------------------------------


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


# --- calibration --------------------------------------------------------------------------------


class _FeedReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)


class _DropQuantizationChatter(logging.Filter):
    """onnxruntime.quantization warns on the root logger that the model was not pre-processed
    (its own optimizer would rewrite the graph we mean to keep): not a detc user's concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Silence onnxruntime.quantization's prints and root-logger warnings while it runs."""
    root = logging.getLogger()
    chatter = _DropQuantizationChatter()
    # logging.warning() would otherwise call basicConfig() and leave a handler on the root logger
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(chatter)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(chatter)
        if placeholder is not None:
            root.removeHandler(placeholder)


def activation_ranges(
    model: ir.Model | onnx.ModelProto,
    feeds: Sequence[Feeds],
    *,
    op_types: Sequence[str] = ("Conv", "Gemm", "MatMul"),
    method: str = "percentile",
    percentile: float = 99.999,
    bins: int = 2048,
    symmetric: bool = False,
    tensors: Collection[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Calibrated ``(low, high)`` of every float tensor that nodes of ``op_types`` read or write.

    onnxruntime's calibrator runs the model on each of ``feeds`` (one at a time). ``symmetric``
    says how the range will be used: percentile then cuts ``|x|``, mse fits a zero-centred grid.
    ``tensors`` limits the answer to those names (entropy's search is slow: ~1 s per tensor).
    """
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    if method not in METHODS:
        raise BadInputError(f"calibration method {method!r}: choose {', '.join(METHODS)}")
    if not feeds:
        raise BadInputError("calibration needs at least one input (no calibration images)")
    if method == "entropy" and bins < 4 * _LEVELS:
        raise BadInputError(f"entropy calibration needs bins >= {4 * _LEVELS}, got {bins}")
    kind = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
        "mse": CalibrationMethod.Entropy,  # the same histograms of values; mse picks the range
    }[method]
    extra: dict[str, Any] = {"symmetric": symmetric}
    if method != "minmax":
        extra.update(num_bins=bins, percentile=percentile)
        extra["num_quantized_bins"] = _LEVELS
    with tempfile.TemporaryDirectory(prefix="detc-calib-") as tmp, _quiet_onnxruntime():
        path = Path(tmp) / "model.onnx"
        onnx.save(to_proto(model), path)
        calibrator = create_calibrator(
            path,
            list(op_types),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=kind,
            extra_options=extra,
        )
        for feed in feeds:  # one image per call: the histogram methods hold all they are given
            calibrator.collect_data(_FeedReader([feed]))

        def wanted(name: str) -> bool:
            return tensors is None or name in tensors

        if method in ("minmax", "percentile"):
            found = calibrator.compute_data()
            ranges = {
                name: _pair(found[name].range_value) for name in list(found.keys()) if wanted(name)
            }
        else:
            collector = calibrator.collector
            histograms = {k: h for k, h in collector.histogram_dict.items() if wanted(k)}
            if method == "entropy":
                ranges = {
                    name: _pair(collector.get_entropy_threshold(h, _window_levels(h, symmetric)))
                    for name, h in histograms.items()
                }
            else:
                ranges = {name: mse_range(h, symmetric=symmetric) for name, h in histograms.items()}
    return ranges


def _window_levels(histogram: Sequence[Any], symmetric: bool) -> int:
    """How many 8-bit levels fall in KL's zero-centred window ``[-t, t]``.

    onnxruntime's KL compares the histogram of values inside ``[-t, t]`` with its copy at a
    fixed number of levels. A symmetric int8 grid spans the window; an asymmetric uint8 one
    spans ``[min, t]`` only, so for non-negative data (after ReLU / SiLU) the window holds
    twice its 256 levels. With 128 levels everywhere (TensorRT's count, for ``|x|``) KL clipped
    yolov5n's activations by 5 mAP points' worth.
    """
    if symmetric:
        return _LEVELS
    low, high = float(histogram[2]), float(histogram[3])
    bound = max(abs(low), abs(high), 1e-30)
    spanned = (bound - max(min(low, 0.0), -bound)) / (2 * bound)  # share of [-T, T] the grid covers
    return int(2 * round(_LEVELS / max(spanned, 0.5) / 2))


def _pair(values: Sequence[Any]) -> tuple[float, float]:
    low, high = values[0], values[1]
    return float(np.min(low)), float(np.max(high))


def _quantize_dequantize(
    values: np.ndarray, low: np.ndarray, high: np.ndarray, symmetric: bool
) -> np.ndarray:
    """The 8-bit grid's reproduction of ``values`` (1-D) for each candidate range (rows)."""
    low = np.minimum(low, 0.0)[:, None]
    high = np.maximum(high, 0.0)[:, None]
    if symmetric:
        scale = np.maximum(np.maximum(-low, high), 1e-12) / 127.0
        codes = np.clip(np.round(values[None, :] / scale), -127, 127)
        return codes * scale
    scale = np.maximum(high - low, 1e-12) / 255.0
    zero = np.round(-low / scale)
    codes = np.clip(np.round(values[None, :] / scale) + zero, 0, 255)
    return (codes - zero) * scale


def mse_range(histogram: Sequence[Any], *, symmetric: bool = False) -> tuple[float, float]:
    """The range whose 8-bit grid reproduces a histogram with the least expected squared error.

    ``histogram`` is onnxruntime's ``(counts, edges, min, max, ...)``. Candidates shrink the
    observed range ``[min, max]`` toward zero; each is scored on points spread evenly through
    every bin (a bin's centre alone would misjudge grids whose step nears the bin width).
    """
    counts = np.asarray(histogram[0], dtype=np.float64)
    edges = np.asarray(histogram[1], dtype=np.float64)
    observed_low, observed_high = float(histogram[2]), float(histogram[3])
    used = counts > 0
    if not used.any() or observed_high <= observed_low:
        return observed_low, observed_high
    starts, widths = edges[:-1][used], np.diff(edges)[used]
    offsets = (np.arange(_MSE_POINTS_PER_BIN) + 0.5) / _MSE_POINTS_PER_BIN
    points = np.clip(starts[:, None] + widths[:, None] * offsets, observed_low, observed_high)
    weights = np.repeat(counts[used] / _MSE_POINTS_PER_BIN, _MSE_POINTS_PER_BIN)
    points = points.ravel()
    shrink = np.linspace(1.0 / _MSE_CANDIDATES, 1.0, _MSE_CANDIDATES)

    def best(lows: np.ndarray, highs: np.ndarray) -> int:
        errors = ((_quantize_dequantize(points, lows, highs, symmetric) - points) ** 2) @ weights
        return int(np.argmin(errors))

    if symmetric:
        bounds = shrink * max(abs(observed_low), abs(observed_high))
        bound = float(bounds[best(-bounds, bounds)])
        return max(-bound, observed_low), min(bound, observed_high)
    # the two ends clip different tails: search each with the other fixed, twice over
    low, high = min(observed_low, 0.0), max(observed_high, 0.0)
    for _ in range(2):
        highs = shrink * max(observed_high, 0.0)
        high = float(highs[best(np.full_like(highs, low), highs)])
        lows = shrink * min(observed_low, 0.0)
        low = float(lows[best(lows, np.full_like(lows, high))])
    return max(low, observed_low), min(high, observed_high)


# --- quantizing with the calibrated ranges --------------------------------------------------


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
    with tempfile.TemporaryDirectory(prefix="detc-qdq-") as tmp, _quiet_onnxruntime():
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


@dataclass
class CalibratedModel:
    """A float model and its calibrated activation ranges: quantize any subset of its layers.

    What the sensitivity analysis and mixed precision work from: quantizing layer after layer
    never recalibrates.
    """

    proto: onnx.ModelProto  # every node named
    ranges: dict[str, tuple[float, float]]
    layers: list[QuantLayer]
    rejected: list[tuple[str, str, str]]
    feeds: list[Feeds]
    settings: QdqSettings
    method: str

    def quantize(self, layers: Iterable[str] | None = None) -> onnx.ModelProto:
        """The model with ``layers`` (names; default: all quantizable) quantized."""
        names = [q.name for q in self.layers] if layers is None else list(layers)
        unknown = sorted(set(names) - {q.name for q in self.layers})
        if unknown:
            raise BadInputError(f"cannot quantize {unknown[0]!r}: not a quantizable layer")
        return quantize_qdq(self.proto, self.ranges, names, self.settings)


def calibrate_model(
    model: ir.Model | onnx.ModelProto,
    feeds: Sequence[Feeds],
    *,
    op_types: Sequence[str] = ("Conv", "Gemm", "MatMul"),
    excluded: Iterable[str] = (),
    method: str = "percentile",
    percentile: float = 99.999,
    bins: int = 2048,
    settings: QdqSettings = QdqSettings(),
) -> CalibratedModel:
    """Name the nodes of (a copy of) ``model``, find its quantizable layers, calibrate them."""
    work = ir.serde.deserialize_model(to_proto(model))  # a copy: ``model`` is never touched
    _check_opset(work, settings)
    name_unnamed_nodes(work.graph)
    layers, rejected = quantizable_layers(work, op_types, excluded)
    proto = ir.serde.serialize_model(work)
    ranges: dict[str, tuple[float, float]] = {}
    if layers:
        chosen = {q.name for q in layers}
        needed = {
            value.name
            for node in work.graph
            if node.name in chosen
            for value in [*node.inputs, *(node.outputs if settings.quantize_outputs else [])]
            if value is not None and value.name and not _is_constant(value)
        }
        ranges = activation_ranges(
            proto,
            feeds,
            op_types=sorted({q.op_type for q in layers}),
            method=method,
            percentile=percentile,
            bins=bins,
            symmetric=settings.symmetric_activations,
            tensors=needed,
        )
    return CalibratedModel(proto, ranges, layers, rejected, list(feeds), settings, method)


#: what :meth:`Calibration.apply` takes: a path, a model, or one calibrated already
CalibrationSource: TypeAlias = (
    "CalibratedModel | ir.Model | onnx.ModelProto | str | os.PathLike[str]"
)


@dataclass(frozen=True)
class Calibration:
    """How a float model is calibrated: the ``quantize`` pass's options, and what
    :func:`detc.passes.quantize.mixed_precision.layer_sensitivity` / ``mixed_precision`` take."""

    calib: str | os.PathLike[str] | None = None  # a folder of images or a COCO dataset
    calib_images: int = 32
    seed: int = 0
    method: str = "percentile"
    percentile: float = 99.999
    bins: int = 2048
    activations: str = "asymmetric"
    per_channel: bool = True
    quantize_outputs: bool = False
    ops: Sequence[str] = ("Conv", "Gemm", "MatMul")
    exclude: Sequence[str] = ()

    def apply(
        self, model: CalibrationSource, spec_path: str | os.PathLike[str] | None = None
    ) -> CalibratedModel:
        """``model`` calibrated (returned as is when it already is a :class:`CalibratedModel`);
        ``spec_path``: the model spec that says how images are preprocessed."""
        if isinstance(model, CalibratedModel):
            return model
        float_model: ir.Model | onnx.ModelProto
        if isinstance(model, (str, os.PathLike)):
            from detc.compiler.frontend import load_model

            float_model = load_model(model).model
        else:
            float_model = model
        if self.calib is None:
            raise BadInputError(
                "int8 calibration needs images: give calib (a folder or COCO dataset)"
            )
        feeds = calibration_feeds(
            float_model,
            self.calib,
            max_images=self.calib_images,
            seed=self.seed,
            spec_path=spec_path,
        )
        settings = QdqSettings(
            self.per_channel, self.activations == "symmetric", self.quantize_outputs
        )
        calibrated = calibrate_model(
            float_model,
            feeds,
            op_types=self.ops,
            excluded=self.exclude,
            method=self.method,
            percentile=self.percentile,
            bins=self.bins,
            settings=settings,
        )
        if not calibrated.layers:
            why = f": {calibrated.rejected[0][2]}" if calibrated.rejected else ""
            raise BadInputError(
                f"the model has no {'/'.join(self.ops)} layer to quantize "
                f"({len(calibrated.rejected)} refused{why}); check ops= and exclude="
            )
        return calibrated


def _check_opset(model: ir.Model, settings: QdqSettings) -> None:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if settings.per_channel and opset < _MIN_QDQ_OPSET:
        raise BadInputError(
            f"per-channel int8 needs opset >= {_MIN_QDQ_OPSET}, the model has {opset}: convert it "
            "(onnx.version_converter) or give per_channel=false"
        )


# --- float16 ------------------------------------------------------------------------------------

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


def _is_constant(value: ir.Value) -> bool:
    if value.is_graph_input():
        return False
    if value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", None)


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
                dtype[source] = constant_dtype(source) if _is_constant(source) else _F32
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
        v is not None and dtype.get(v) == _F16 and not _is_constant(v) for v in node.inputs
    )
    reads_weight = any(
        _is_f32(v) and v is not None and _is_constant(v) and inputs[i].convertible
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


# --- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerDecision:
    name: str
    op_type: str
    quantized: bool
    reason: str = ""  # why it stays float
    macs: int = 0


@dataclass
class QuantizeReport:
    options: str
    mode: str
    method: str = ""
    calib_images: int = 0
    layers: list[LayerDecision] = field(default_factory=list)
    float16: Float16Report | None = None
    float_map: float | None = None  # mixed precision: COCO mAP@[.5:.95] of the float model
    quantized_map: float | None = None  # ... of the returned model
    fully_quantized_map: float | None = None
    trials: list[tuple[int, float]] = field(default_factory=list)  # (layers kept float, mAP)

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.quantized]

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "mode": self.mode,
            "method": self.method,
            "calib_images": self.calib_images,
            "quantized": len(self.quantized),
            "kept_float": len(self.layers) - len(self.quantized),
            "float_map": self.float_map,
            "fully_quantized_map": self.fully_quantized_map,
            "quantized_map": self.quantized_map,
            "trials": [list(t) for t in self.trials],
            "layers": [vars(d) for d in self.layers],
            "float16": None if self.float16 is None else vars(self.float16),
        }

    def table(self) -> str:
        if self.float16 is not None:
            return self.float16.table()
        total = sum(d.macs for d in self.layers) or 1
        done = self.quantized
        share = sum(d.macs for d in done) / total
        lines = [
            f"quantize int8: {len(done)} of {len(self.layers)} layers quantized "
            f"({100 * share:.1f} % of their MACs), {self.method} ranges on {self.calib_images} "
            "calibration images"
        ]
        if self.float_map is not None:

            def points(value: float | None) -> str:
                return "-" if value is None else f"{100 * value:.2f}"

            lines.append(
                f"  mAP@[.5:.95]: float {points(self.float_map)}, all int8 "
                f"{points(self.fully_quantized_map)}, returned {points(self.quantized_map)}"
            )
            tried = ", ".join(f"{count} float: {points(value)}" for count, value in self.trials)
            lines.append(f"  trials (most sensitive layers kept float: mAP): {tried}")
        for d in self.layers:
            if not d.quantized:
                lines.append(f"  {d.name[:48]:<48} kept float: {d.reason}")
        return "\n".join(lines)


# --- the pass -----------------------------------------------------------------------------------


class QuantizePass(DetcPass):
    """int8 post-training static quantization as QDQ ONNX (or float16), calibrated on images.

    int8: weights symmetric per output channel, activations uint8 asymmetric (or int8
    symmetric) with ranges from minmax / percentile / entropy / mse on ``calib`` images, written
    by onnxruntime.quantization in QDQ form; ``max_map_drop`` keeps the most sensitive layers in
    float until the measured mAP drop fits. fp16: float16 weights and ops, float32 I/O.
    """

    name = "quantize"
    exact = False
    Options = QuantizeOptions

    options: QuantizeOptions

    def __init__(self, options: QuantizeOptions | None = None) -> None:
        super().__init__(options)
        self.report: QuantizeReport | None = None

    def explain(self, model: ir.Model) -> list[Candidate]:
        opts = self.options
        if opts.mode == "fp16":
            return []
        layers, rejected = quantizable_layers(model, opts.op_types, opts.excluded)
        lines = [Candidate(name, op, False, reason) for name, op, reason in rejected]
        lines += [Candidate(q.name, q.op_type, True) for q in layers]
        return lines

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        report = QuantizeReport(str(opts), opts.mode)
        self.report = report
        if opts.mode == "fp16":
            report.float16 = convert_float16(model, keep=opts.excluded, policy=opts.fp16_policy)
            return PassResult(model, bool(report.float16.converted or report.float16.weights))
        layers, rejected = quantizable_layers(model, opts.op_types, opts.excluded)
        if not layers:
            report.layers = [LayerDecision(n, op, False, r) for n, op, r in rejected]
            logger.info("quantize: nothing to quantize (%d candidates refused)", len(rejected))
            return PassResult(model, False)
        if opts.calib is None:
            raise BadInputError(
                "pass 'quantize': int8 needs calibration images: give calib=DIR (a folder of "
                "images or a COCO dataset), e.g. quantize{calib=data/coco}"
            )
        calibrated = Calibration(
            opts.calib,
            opts.calib_images,
            opts.seed,
            opts.method,
            opts.percentile,
            opts.bins,
            opts.activations,
            opts.per_channel,
            opts.quantize_outputs,
            opts.op_types,
            tuple(opts.excluded),
        ).apply(model, opts.spec)
        report.method, report.calib_images = opts.method, len(calibrated.feeds)
        kept_reasons: dict[str, str] = {}
        if opts.max_map_drop is not None:
            proto = self._mixed_precision(calibrated, report, kept_reasons)
        else:
            proto = calibrated.quantize()
        _replace_model(model, proto)
        done = quantized_nodes(proto)
        report.layers = [LayerDecision(n, op, False, r) for n, op, r in calibrated.rejected]
        for layer in calibrated.layers:
            reason = kept_reasons.get(layer.name, "onnxruntime.quantization left it in float")
            quantized = layer.name in done
            report.layers.append(
                LayerDecision(
                    layer.name, layer.op_type, quantized, "" if quantized else reason, layer.macs
                )
            )
        logger.info("%s", report.table())
        return PassResult(model, bool(done))

    def _mixed_precision(
        self, calibrated: CalibratedModel, report: QuantizeReport, kept_reasons: dict[str, str]
    ) -> onnx.ModelProto:
        from detc.passes.quantize.mixed_precision import mixed_precision

        opts = self.options
        data = opts.data if opts.data is not None else opts.calib
        if data is None or not (Path(data) / "instances.json").is_file():
            raise BadInputError(
                f"pass 'quantize': max_map_drop measures mAP on a COCO dataset, and {data} has no "
                "instances.json: give data=DIR (images/ + instances.json)"
            )
        assert opts.max_map_drop is not None
        result = mixed_precision(
            calibrated,
            data=data,
            decoder=opts.decoder,
            max_map_drop=opts.max_map_drop,
            rank_by=opts.rank_by,
            max_images=opts.eval_images,
            probe_images=opts.probe_images,
            spec_path=opts.spec,
        )
        report.float_map = result.float_map
        report.fully_quantized_map = result.fully_quantized_map
        report.quantized_map = result.map
        report.trials = [(t.kept_float, t.map) for t in result.trials]
        for layer in result.kept_float:
            kept_reasons[layer.name] = (
                f"kept float by max_map_drop={opts.max_map_drop}: {layer.describe()}"
            )
        return result.model


def _replace_model(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Make ``model`` (in place: the pass manager holds it) the quantized ``proto``."""
    replacement = ir.serde.deserialize_model(proto)

    def interface(graph: ir.Graph) -> list[tuple[str | None, ir.DataType | None]]:
        return [(v.name, v.dtype) for v in [*graph.inputs, *graph.outputs]]

    if interface(replacement.graph) != interface(model.graph):
        raise BadInputError(
            "pass 'quantize': onnxruntime.quantization changed the graph's inputs or outputs "
            f"({interface(model.graph)} -> {interface(replacement.graph)}); report this model"
        )
    model.graph = replacement.graph
    model.ir_version = replacement.ir_version
