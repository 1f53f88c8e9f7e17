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
quantized again without recalibrating (:meth:`.calibrate.CalibratedModel.quantize`, used by
the sensitivity analysis and mixed precision in :mod:`detc.passes.quantize.mixed_precision`;
the graph is written in :mod:`.qdq`). Ranges (:mod:`.ranges`) come from ``minmax``,
``percentile`` or ``entropy`` (onnxruntime's algorithms; KL with 2048 histogram bins and the
levels an 8-bit grid really has), or ``mse``: the clipping range whose 8-bit grid has the least
expected squared rounding plus clipping error, searched on onnxruntime's histograms.

``max_map_drop`` starts from the fully quantized model and keeps the layers whose quantization
hurts most in float until the measured COCO mAP drop fits the budget
(:func:`detc.passes.quantize.mixed_precision.mixed_precision`).

**float16** (``mode=fp16``). Float32 weights become float16 and every op that onnxruntime's CPU
provider has a float16 kernel for computes in float16; graph inputs and outputs stay float32
(Casts at the edges). Ops without such a kernel stay float32 behind Casts: which ones is asked
of onnxruntime itself, by building each op alone in float16 and seeing whether onnxruntime
inserts Casts around it. ``fp16_policy=all`` converts every op ONNX allows in float16, for
targets that compute in it (onnxruntime then inserts its own Casts). See :mod:`.fp16`.

This module is the pass; its options are in :mod:`.options`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pass_base import Candidate, DetcPass, PassResult
from detc.passes.quantize.calibrate import CalibratedModel, Calibration
from detc.passes.quantize.fp16 import Float16Report, convert_float16
from detc.passes.quantize.mixed_precision import mixed_precision
from detc.passes.quantize.options import ACTIVATIONS, METHODS, RANK_BY, QuantizeOptions
from detc.passes.quantize.qdq import quantizable_layers, quantized_nodes

logger = logging.getLogger(__name__)

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
    calibration_option = "calib"

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


#: the option choices the CLI offers, beside the pass (they live in :mod:`.options`)
__all__ = [
    "ACTIVATIONS",
    "METHODS",
    "RANK_BY",
    "LayerDecision",
    "QuantizeOptions",
    "QuantizePass",
    "QuantizeReport",
    "quantized_nodes",
]
