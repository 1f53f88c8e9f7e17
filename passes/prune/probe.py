"""Trial cuts of ``allocation=outputs``: a group cut alone, its consumers refit in one shot,
and the damage measured on the model's outputs (as detections when a decoder reads them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.detection.agreement import confident_truths, map_against_reference
from detc.compiler.detection.decoders import Detections, decode
from detc.compiler.detection.spec import ModelSpec, spec_for_model
from detc.compiler.errors import BadInputError
from detc.compiler.reference import ort_session, run_session, to_proto
from detc.passes.calibration import with_extra_outputs
from detc.passes.prune.groups import ChannelGraph, ChannelGroup
from detc.passes.prune.options import ProbeCut
from detc.passes.prune.reconstruct import patch_mask
from detc.passes.prune.statistics import Statistics, is_head, one_shot
from detc.passes.recover.losses import HeadLayout, HeadTerms, yolo_head_layout
from detc.passes.torch_graph import import_torch

#: how deep (fraction of its channels) allocation=outputs cuts each group, alone, to measure it
_PROBE_DEPTHS = (0.125, 0.25, 0.375, 0.5)
DETECTIONS_METRIC = "1 - mAP@[.5:.95] against the original's detections"
HEADS_METRIC = (
    "head error: objectness and class KL, boxes in grid and anchor units, per expected object"
)
FEATURES_METRIC = "relative squared error of the head Convs' outputs"


def probe_cuts(group: ChannelGroup, floor: int, multiple: int) -> list[int]:
    """How many units each trial of ``group`` removes: its depths, in whole multiples."""
    cuts: list[int] = []
    for depth in _PROBE_DEPTHS:
        units = min(multiple * max(1, math.ceil(group.size * depth / multiple)), group.size - floor)
        if units > 0 and units not in cuts:
            cuts.append(units)
    return cuts


def trial_weights(
    cg: ChannelGraph,
    group: ChannelGroup,
    removed: np.ndarray,
    stats: Statistics,
    ridge: float,
) -> dict[ir.Node, tuple[np.ndarray, np.ndarray]]:
    """Weights of the Convs reading ``group`` once ``removed`` go, refit in one shot.

    The removed inputs keep zero columns instead of being sliced away: the same function as the
    pruned graph, so a trial is the original graph with a few weights swapped. The ridge is
    fixed: choosing it on held-back images, as the final refit does, measured no better
    allocation and costs a solve per strength and trial.
    """
    weights: dict[ir.Node, tuple[np.ndarray, np.ndarray]] = {}
    for consumer in group.consumers:
        layer = stats.layers.get(id(consumer))
        keep_in = cg.keep_mask(consumer.inputs[0], removed)
        if layer is None or keep_in is None or keep_in.all():
            continue
        columns = patch_mask(keep_in, layer.taps)
        theta = one_shot(layer, keep_in, None).solve(ridge, prior=layer.original[:, columns].T)
        full = np.zeros_like(layer.original)
        full[:, columns] = theta.T
        dtype = layer.role.weight.dtype
        weights[consumer] = (
            full[:, :-1].reshape(layer.role.weight.shape).astype(dtype),
            full[:, -1].astype(dtype),
        )
    return weights


class OutputProbe:
    """Runs the original graph with some Convs' weights swapped; scores its outputs.

    The score is the disagreement with the original model: with a decoder that reads the
    outputs (the model spec's), one minus the mAP@[.5:.95] of the trial's detections against the
    original's confident detections; else the relative squared error of the head Convs'
    outputs (per channel, averaged), or of the graph outputs when there is no head.
    """

    def __init__(
        self,
        model: ir.Model,
        cg: ChannelGraph,
        feeds: Sequence[dict[str, np.ndarray]],
        spec_path: Path | None,
        metric: str = "detections",
    ) -> None:
        heads = [r.node.outputs[0] for r in cg.convs if is_head(cg, r.node)]
        self._compared = [v.name for v in heads if v.name and not v.is_graph_output()]
        base = to_proto(model)
        self._base = with_extra_outputs(base, self._compared) if self._compared else base
        if not self._compared:
            self._compared = [o.name for o in self._base.graph.output]
        self._positions = {id(node): i for i, node in enumerate(model.graph)}
        self._feeds = list(feeds)
        session = ort_session(self._base)
        self._reference = [run_session(session, feed) for feed in self._feeds]
        self._spec = self._detection_spec(spec_path)
        self._truths: list[Detections] | None = None
        self._layouts: dict[str, HeadLayout] = {}
        if metric == "heads" and self._spec is not None:
            self._layouts = _yolo_layouts(self._reference[0], self._compared, self._spec)
        if self._spec is not None and not self._layouts:
            self._truths = confident_truths(self._detections(self._reference))
        self.metric = (
            HEADS_METRIC
            if self._layouts
            else DETECTIONS_METRIC
            if self._truths is not None
            else FEATURES_METRIC
        )
        self.cuts: list[ProbeCut] = []

    def _detection_spec(self, spec_path: Path | None) -> ModelSpec | None:
        spec = spec_for_model(self._base, spec_path)
        try:  # a spec inferred for a model that is no detector: its outputs do not decode
            self._detections(self._reference[:1], spec)
        except (BadInputError, ValueError, IndexError, KeyError):
            return None
        return spec

    def _detections(
        self, outputs: Sequence[dict[str, np.ndarray]], spec: ModelSpec | None = None
    ) -> list[Detections]:
        chosen = spec or self._spec
        assert chosen is not None
        return [decode(chosen.decoder, o, chosen) for o in outputs]

    def distortion(self, weights: dict[ir.Node, tuple[np.ndarray, np.ndarray]]) -> float:
        proto = onnx.ModelProto()
        proto.CopyFrom(self._base)
        for number, (node, (weight, bias)) in enumerate(weights.items()):
            target = proto.graph.node[self._positions[id(node)]]
            names = (f"prune_probe_{number}_weight", f"prune_probe_{number}_bias")
            proto.graph.initializer.extend(
                [
                    onnx.numpy_helper.from_array(weight, names[0]),
                    onnx.numpy_helper.from_array(bias, names[1]),
                ]
            )
            inputs = [*target.input, "", ""][:3]
            inputs[1:3] = names
            del target.input[:]
            target.input.extend(inputs)
        session = ort_session(proto)
        outputs = [run_session(session, feed) for feed in self._feeds]
        if self._layouts:
            return head_error(self._reference, outputs, self._layouts)
        if self._truths is not None:
            return 1.0 - map_against_reference(self._truths, self._detections(outputs))
        return _relative_error(self._reference, outputs, self._compared)


def _yolo_layouts(
    reference: dict[str, np.ndarray], names: Sequence[str], spec: ModelSpec
) -> dict[str, HeadLayout]:
    """The YOLOv5 layout of every compared head, or none when one of them has another.

    The class count is the spec's, else read off the decoded output's rows (box, objectness,
    then one score per class).
    """
    classes = len(spec.class_names)
    decoded = reference.get(spec.output_name or "", next(iter(reference.values())))
    if not classes and decoded.ndim == 3:
        classes = decoded.shape[-1] - 5
    layouts = {}
    for name in names:
        value = reference[name]
        layout = None
        if value.ndim == 4:
            layout = yolo_head_layout(value.shape[1], spec.decoder, classes)
        if layout is None:
            return {}
        layouts[name] = layout
    return layouts


def head_error(
    reference: Sequence[dict[str, np.ndarray]],
    outputs: Sequence[dict[str, np.ndarray]],
    layouts: dict[str, HeadLayout],
) -> float:
    """The error recover minimises (:class:`~detc.passes.recover.losses.HeadTerms`), on raw
    YOLOv5 heads, in float64: objectness and classes as Bernoulli KL, box centres in grid cells
    and sizes in anchor units (boxes and classes weighted by the original's objectness), all
    over the original's expected object count.

    Unlike the agreement of confident detections it is continuous: a cut that moves scores
    below the confidence floor or shifts boxes by a fraction of a cell still counts, so a few
    images rank small cuts instead of scoring most of them 0.
    """
    torch = import_torch()
    terms = HeadTerms()
    with torch.no_grad():
        for expected, actual in zip(reference, outputs, strict=True):
            for name, layout in layouts.items():
                student = torch.from_numpy(actual[name].astype(np.float64))
                teacher = torch.from_numpy(expected[name].astype(np.float64))
                terms.add(torch, student, teacher, layout)
    return float(terms.total())


def _relative_error(
    reference: Sequence[dict[str, np.ndarray]],
    outputs: Sequence[dict[str, np.ndarray]],
    names: Sequence[str],
) -> float:
    """Squared error over variance, per channel (axis 1) of each tensor, averaged."""
    ratios = []
    for name in names:
        expected = np.concatenate([r[name] for r in reference]).astype(np.float64)
        actual = np.concatenate([o[name] for o in outputs]).astype(np.float64)
        if expected.ndim >= 2:
            expected = np.moveaxis(expected, 1, 0).reshape(expected.shape[1], -1)
            actual = np.moveaxis(actual, 1, 0).reshape(actual.shape[1], -1)
        else:
            expected, actual = expected.reshape(1, -1), actual.reshape(1, -1)
        error = ((actual - expected) ** 2).sum(axis=1)
        variance = ((expected - expected.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        ratios.append(error / (variance + 1e-3 * float(variance.mean()) + 1e-30))
    return float(np.concatenate(ratios).mean())
