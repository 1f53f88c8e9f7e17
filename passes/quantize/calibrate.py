"""A float model calibrated once (:class:`CalibratedModel`): quantize any subset of its layers
without recalibrating; :class:`Calibration` says how (the ``quantize`` pass's options)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.compiler.reference import to_proto
from detc.passes._graph_facts import is_constant
from detc.passes.calibration import Feeds, calibration_feeds
from detc.passes.quantize.qdq import (
    QdqSettings,
    QuantLayer,
    name_unnamed_nodes,
    quantizable_layers,
    quantize_qdq,
)
from detc.passes.quantize.ranges import activation_ranges

_MIN_QDQ_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear (axis attribute)


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
    settings: QdqSettings = QdqSettings(),  # noqa: B008 (a frozen dataclass)
) -> CalibratedModel:
    """Name the nodes of (a copy of) ``model``, find its quantizable layers, calibrate them."""
    # a copy: ``model`` is never touched
    work = ir.serde.deserialize_model(_at_qdq_opset(to_proto(model), settings))
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
            if value is not None and value.name and not is_constant(value)
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


def _at_qdq_opset(model: onnx.ModelProto, settings: QdqSettings) -> onnx.ModelProto:
    """Per-channel QDQ needs opset 13 (the ``axis`` of QuantizeLinear): convert older models.

    Converting an opset is exact (the same computation in newer operator versions); a model that
    onnx's converter cannot convert is refused with what to do.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not settings.per_channel or opset >= _MIN_QDQ_OPSET:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, _MIN_QDQ_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(
            f"per-channel int8 needs opset >= {_MIN_QDQ_OPSET}; converting this opset-{opset} "
            f"model failed ({first}): re-export it at opset {_MIN_QDQ_OPSET} or give "
            "per_channel=false"
        ) from None
    return converted
