"""Raw detector outputs → boxes: decoders for common heads, a registry, and a custom hook.

A decoder is ``(outputs: Mapping[str, np.ndarray], spec: ModelSpec) -> Detections``: it returns
final detections (after the score floor, class-aware NMS and the ``max_detections`` cap), boxes
x1,y1,x2,y2 in model-input pixels. Built-in decoders:

- ``yolov5`` / ``demo``: ``(1, N, 5+C)`` cx, cy, w, h, objectness, C class probabilities;
  score = objectness × class probability.
- ``yolov8``: ``(1, 4+C, N)`` channels-first, cx, cy, w, h, C class probabilities; no objectness.
- ``yolox``: YOLOX exported with ``decode_in_inference=False``: ``(1, N, 5+C)`` per grid cell
  of strides 8, 16, 32 — x, y offsets in cells, log w, log h, then objectness and classes
  (YOLOX's head already applies the sigmoid to those); ``yolox-logits`` for heads that do not.

Each box keeps its best class (score = max over classes), as YOLOv5's detect.py and most
deployments do; the reference mAP figures of ../shared/data/README.md are measured that way
(every-pair "multi-label" candidates, `postprocess(..., multi_label=True)`, shift mAP@.5 by
about a point on coco64).

A custom decoder is named ``package.module:function`` and gets the same arguments; it may use
`postprocess` to apply the spec's thresholds and NMS to its candidates.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import numpy as np

from detc.compiler.detection.nms import nms
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError

#: YOLOv5 / Ultralytics cap on candidates that enter NMS (keeps a bad model from stalling NMS)
MAX_NMS_CANDIDATES = 30_000


@dataclass(frozen=True)
class Detections:
    """Detections of one image: boxes (N, 4) x1,y1,x2,y2 float32, scores (N,), class_ids (N,)."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        class_ids = np.asarray(self.class_ids).reshape(-1)
        fractional = class_ids.size and not np.issubdtype(class_ids.dtype, np.integer)
        if fractional and not np.all(np.equal(np.mod(class_ids, 1), 0)):
            raise ValueError("Detections: class_ids must be whole numbers")
        class_ids = class_ids.astype(np.int64)
        if not boxes.shape[0] == scores.shape[0] == class_ids.shape[0]:
            raise ValueError(
                f"Detections: {boxes.shape[0]} boxes, {scores.shape[0]} scores and "
                f"{class_ids.shape[0]} class ids must agree"
            )
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "class_ids", class_ids)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, index: np.ndarray) -> Detections:
        """The detections at ``index`` (integer indices or a boolean mask)."""
        return Detections(self.boxes[index], self.scores[index], self.class_ids[index])

    def above(self, score_threshold: float) -> Detections:
        return self.take(self.scores >= score_threshold)

    def with_boxes(self, boxes: np.ndarray) -> Detections:
        return Detections(boxes, self.scores, self.class_ids)


Decoder: TypeAlias = Callable[[Mapping[str, np.ndarray], ModelSpec], Detections]
_DecoderT = TypeVar("_DecoderT", bound=Decoder)

_REGISTRY: dict[str, Decoder] = {}


def register_decoder(name: str, decoder: Decoder | None = None) -> Callable[[_DecoderT], _DecoderT]:
    """Register ``decoder`` under ``name``; use directly or as ``@register_decoder("name")``."""

    def add(fn: _DecoderT) -> _DecoderT:
        _REGISTRY[name] = fn
        return fn

    if decoder is not None:
        add(decoder)
    return add


def decoder_names() -> list[str]:
    return sorted(_REGISTRY)


def get_decoder(name: str | Decoder) -> Decoder:
    """A registered decoder by name, a ``package.module:function`` hook, or ``name`` if callable."""
    if callable(name):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise BadInputError(
            f"decoder {name!r} is not known; use one of {', '.join(decoder_names())} "
            "or a custom 'package.module:function'"
        )
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise BadInputError(
            f"decoder {name!r}: write a custom decoder as 'package.module:function'"
        )
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as err:
        raise BadInputError(
            f"decoder {name!r}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH?"
        ) from None
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise BadInputError(f"decoder {name!r}: module {module_name!r} has no {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise BadInputError(f"decoder {name!r}: {attr_path!r} is not callable")
    return target


def decode(
    decoder: str | Decoder, outputs: Mapping[str, np.ndarray], spec: ModelSpec
) -> Detections:
    """Run ``decoder`` and check what it returned (custom decoders are checked the same way)."""
    fn = get_decoder(decoder)
    result = fn(outputs, spec)
    if not isinstance(result, Detections):
        label = decoder if isinstance(decoder, str) else getattr(fn, "__name__", repr(fn))
        raise BadInputError(
            f"decoder {label!r} returned {type(result).__name__}, not detc Detections"
        )
    return result


def select_output(outputs: Mapping[str, np.ndarray], spec: ModelSpec) -> np.ndarray:
    """The output a decoder reads: ``spec.output_name`` if set, else the first output."""
    if not outputs:
        raise BadInputError("the model produced no outputs to decode")
    if spec.output_name is not None:
        if spec.output_name not in outputs:
            raise BadInputError(
                f"output {spec.output_name!r} (spec output_name) is not among the model "
                f"outputs {', '.join(outputs)}"
            )
        return np.asarray(outputs[spec.output_name])
    return np.asarray(next(iter(outputs.values())))


def _rows(output: np.ndarray, min_columns: int, decoder: str) -> np.ndarray:
    """(1, N, K) or (N, K) → (N, K) float32."""
    if output.ndim == 3 and output.shape[0] == 1:
        output = output[0]
    if output.ndim != 2 or output.shape[1] < min_columns:
        raise BadInputError(
            f"decoder {decoder!r} expects an output (1, N, {min_columns - 1}+C); got shape "
            f"{tuple(output.shape)}: pick another --decoder or output"
        )
    return output.astype(np.float32, copy=False)


def _check_classes(num_classes: int, spec: ModelSpec, decoder: str, shape: tuple[int, ...]) -> None:
    if spec.num_classes is not None and num_classes != spec.num_classes:
        raise BadInputError(
            f"decoder {decoder!r}: output shape {shape} has {num_classes} class columns but the "
            f"spec names {spec.num_classes} classes: check --decoder and the class names"
        )


def cxcywh_to_xyxy(cxcywh: np.ndarray) -> np.ndarray:
    cx, cy, w, h = cxcywh[:, 0], cxcywh[:, 1], cxcywh[:, 2], cxcywh[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def postprocess(
    boxes_xyxy: np.ndarray,
    class_scores: np.ndarray,
    spec: ModelSpec,
    *,
    multi_label: bool = False,
) -> Detections:
    """Candidates → detections: score floor, top-K pre-NMS, class-aware NMS, ``max_detections``.

    ``class_scores`` is (N, C). Each box is a candidate with its best class when that score is
    strictly above ``spec.score_threshold``; with ``multi_label`` every (box, class) pair above
    it is. Boxes with non-finite coordinates are dropped.
    """
    boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    class_scores = np.asarray(class_scores, dtype=np.float32)
    if class_scores.ndim != 2 or class_scores.shape[0] != boxes_xyxy.shape[0]:
        raise ValueError(
            f"postprocess: class_scores {class_scores.shape} must be (N, C) for "
            f"{boxes_xyxy.shape[0]} boxes"
        )
    finite_boxes = np.logical_and.reduce(np.isfinite(boxes_xyxy), axis=1)
    if multi_label:
        box_index, class_index = np.nonzero(
            (class_scores > spec.score_threshold) & finite_boxes[:, None]
        )
    elif class_scores.shape[1] == 0:
        box_index = class_index = np.zeros(0, dtype=np.int64)
    else:
        best_class = class_scores.argmax(axis=1)
        best_score = class_scores[np.arange(class_scores.shape[0]), best_class]
        box_index = np.nonzero((best_score > spec.score_threshold) & finite_boxes)[0]
        class_index = best_class[box_index]
    scores = class_scores[box_index, class_index]
    if scores.size > MAX_NMS_CANDIDATES:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS_CANDIDATES]
        box_index, class_index, scores = box_index[top], class_index[top], scores[top]
    boxes = boxes_xyxy[box_index]
    keep = nms(
        boxes, scores, spec.iou_threshold, class_ids=class_index, max_keep=spec.max_detections
    )
    return Detections(boxes[keep], scores[keep], class_index[keep])


@register_decoder("yolov5")
def decode_yolov5(outputs: Mapping[str, np.ndarray], spec: ModelSpec) -> Detections:
    rows = _rows(select_output(outputs, spec), 6, "yolov5")
    _check_classes(rows.shape[1] - 5, spec, "yolov5", rows.shape)
    # Objectness alone bounds obj × cls (cls ≤ 1): filtering on it first skips most rows.
    rows = rows[rows[:, 4] > spec.score_threshold]
    return postprocess(cxcywh_to_xyxy(rows[:, :4]), rows[:, 5:] * rows[:, 4:5], spec)


register_decoder("demo", decode_yolov5)


@register_decoder("yolov8")
def decode_yolov8(outputs: Mapping[str, np.ndarray], spec: ModelSpec) -> Detections:
    output = select_output(outputs, spec)
    if output.ndim == 3 and output.shape[0] == 1:
        output = output[0]
    if output.ndim != 2 or min(output.shape) < 5:
        raise BadInputError(
            f"decoder 'yolov8' expects an output (1, 4+C, N); got shape {tuple(output.shape)}"
        )
    # Channels-first (4+C, N) as Ultralytics exports it; a transposed (N, 4+C) export has N > 4+C.
    rows = output.T if output.shape[0] < output.shape[1] else output
    rows = rows.astype(np.float32, copy=False)
    _check_classes(rows.shape[1] - 4, spec, "yolov8", tuple(output.shape))
    return postprocess(cxcywh_to_xyxy(rows[:, :4]), rows[:, 4:], spec)


YOLOX_STRIDES = (8, 16, 32)


def yolox_grid(
    input_size: tuple[int, int], strides: tuple[int, ...] = YOLOX_STRIDES
) -> tuple[np.ndarray, np.ndarray]:
    """Cell (x, y) of every YOLOX prediction (N, 2) and its stride (N, 1); row-major per level."""
    height, width = input_size
    grids, grid_strides = [], []
    for stride in strides:
        rows, cols = height // stride, width // stride
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        grid_strides.append(np.full((rows * cols, 1), stride))
    return (
        np.concatenate(grids).astype(np.float32),
        np.concatenate(grid_strides).astype(np.float32),
    )


def _decode_yolox(
    outputs: Mapping[str, np.ndarray], spec: ModelSpec, *, logits: bool
) -> Detections:
    name = "yolox-logits" if logits else "yolox"
    rows = _rows(select_output(outputs, spec), 6, name)
    _check_classes(rows.shape[1] - 5, spec, name, rows.shape)
    grid, strides = yolox_grid(spec.input_size)
    if grid.shape[0] != rows.shape[0]:
        raise BadInputError(
            f"decoder {name!r}: {rows.shape[0]} predictions, but a {spec.input_size[0]}x"
            f"{spec.input_size[1]} input has {grid.shape[0]} cells at strides 8/16/32: check "
            "input_size, or that the model was exported with decode_in_inference=False"
        )
    centres = (rows[:, :2] + grid) * strides
    with np.errstate(over="ignore"):
        sizes = np.exp(rows[:, 2:4]) * strides
    scores = rows[:, 4:]
    if logits:
        with np.errstate(over="ignore"):
            scores = 1.0 / (1.0 + np.exp(-scores))
    boxes = cxcywh_to_xyxy(np.concatenate([centres, sizes], axis=1))
    return postprocess(boxes, scores[:, 1:] * scores[:, :1], spec)


@register_decoder("yolox")
def decode_yolox(outputs: Mapping[str, np.ndarray], spec: ModelSpec) -> Detections:
    return _decode_yolox(outputs, spec, logits=False)


@register_decoder("yolox-logits")
def decode_yolox_logits(outputs: Mapping[str, np.ndarray], spec: ModelSpec) -> Detections:
    return _decode_yolox(outputs, spec, logits=True)
