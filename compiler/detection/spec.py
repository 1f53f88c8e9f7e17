"""What a detector expects around its graph: preprocessing, output decoding and class names.

A `ModelSpec` is the contract between an image and a raw tensor (resize, pad, channel order,
normalisation, layout, dtype) and between raw outputs and boxes (decoder, thresholds, classes).
It round-trips through a JSON or TOML file, takes CLI overrides, and can be inferred from an
ONNX model's input and its Ultralytics-style ``names`` metadata.

Preprocessing order (see `detc.compiler.detection.datasets.preprocess`): resize/letterbox in
pixel units (``pad_value`` is a pixel value, 0..255), channel order, then
``(x * scale - mean) / std``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import write_text_atomically

RESIZE_MODES = ("letterbox", "resize")
PAD_ALIGNMENTS = ("center", "top-left")
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16")

#: keys a spec file may carry that are not fields: recorded by tools that write specs
#: (``synth``: how a synthetic demo model was made; ``trained``: its training record).
DOCUMENTED_EXTRA_KEYS = frozenset({"synth", "trained"})

#: Each decoder names a detector family, and the family fixes how images are prepared: naming the
#: decoder brings its preprocessing unless the same spec or flags say otherwise. YOLOv5/v8
#: (Ultralytics): RGB in 0..1, letterbox centred on gray 114. YOLOX (Megvii's ``preproc``): BGR
#: as OpenCV reads it, raw 0..255, the image at the top-left of a gray-114 canvas.
_ULTRALYTICS = {
    "resize": "letterbox",
    "pad_value": 114.0,
    "pad_align": "center",
    "channel_order": "RGB",
    "scale": 1.0 / 255.0,
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
}
_YOLOX = {**_ULTRALYTICS, "pad_align": "top-left", "channel_order": "BGR", "scale": 1.0}
FAMILY_PREPROCESSING: Mapping[str, Mapping[str, Any]] = {
    "yolov5": _ULTRALYTICS,
    "yolov8": _ULTRALYTICS,
    "demo": _ULTRALYTICS,
    "yolox": _YOLOX,
    "yolox-logits": _YOLOX,
}


def family_preprocessing(decoder: str) -> dict[str, Any]:
    """The preprocessing fields a decoder's family prescribes ({} for a custom decoder)."""
    return dict(FAMILY_PREPROCESSING.get(decoder, {}))


#: YOLOv5 / YOLOv8 exports store the input size they were made for; used when the graph's
#: input has symbolic spatial dimensions.
_DEFAULT_INPUT_SIZE = (640, 640)


@dataclass(frozen=True)
class ModelSpec:
    """Preprocessing and decoding contract of one detector (defaults: YOLOv5, COCO-style)."""

    input_name: str = "images"
    input_size: tuple[int, int] = _DEFAULT_INPUT_SIZE  # (height, width) of the model input
    resize: str = "letterbox"  # "letterbox" keeps aspect ratio and pads; "resize" stretches
    pad_value: float = 114.0  # pixel value (0..255) of the letterbox border
    pad_align: str = "center"  # YOLOv5/v8 centre the image; YOLOX puts it top-left
    channel_order: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    dtype: str = "float32"
    decoder: str = "yolov5"  # a registered name, or "package.module:function"
    output_name: str | None = None  # which output the decoder reads; None: the first
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] | None = None  # class index -> dataset category id
    score_threshold: float = 0.001
    iou_threshold: float = 0.65
    max_detections: int = 300
    # not part of equality: it documents where the spec came from
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Normalise list-like values so a spec read from JSON equals one written in Python.
        for name in _FIELD_NAMES:
            if name == "source":
                continue
            value = getattr(self, name)
            coerced = _coerce(name, value)
            if coerced is not value:
                object.__setattr__(self, name, coerced)
        self._validate()

    def _validate(self) -> None:
        def fail(what: str) -> BadInputError:
            where = f" in {self.source}" if self.source else ""
            return BadInputError(f"model spec{where}: {what}")

        if self.resize not in RESIZE_MODES:
            raise fail(f"resize {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.pad_align not in PAD_ALIGNMENTS:
            raise fail(f"pad_align {self.pad_align!r} is not one of {', '.join(PAD_ALIGNMENTS)}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise fail(f"channel_order {self.channel_order!r} is not RGB or BGR")
        if self.layout not in LAYOUTS:
            raise fail(f"layout {self.layout!r} is not NCHW or NHWC")
        if self.dtype not in DTYPES:
            raise fail(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if min(self.input_size) <= 0:
            raise fail(f"input_size {self.input_size} must be positive (height, width)")
        if any(s == 0.0 for s in self.std):
            raise fail(f"std {self.std} has a zero: it divides the input")
        if self.scale <= 0.0:
            raise fail(f"scale {self.scale} must be positive")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise fail(f"score_threshold {self.score_threshold} is outside [0, 1]")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise fail(f"iou_threshold {self.iou_threshold} is outside (0, 1]")
        if self.max_detections <= 0:
            raise fail(f"max_detections {self.max_detections} must be positive")
        if not self.decoder:
            raise fail("decoder is empty: give a name such as 'yolov5' or 'package.module:func'")
        if (
            self.category_ids is not None
            and self.class_names
            and len(self.category_ids) != len(self.class_names)
        ):
            raise fail(
                f"{len(self.category_ids)} category_ids for {len(self.class_names)} class_names: "
                "give one category id per class"
            )

    @property
    def num_classes(self) -> int | None:
        """Number of classes the spec knows of (None when it names none)."""
        if self.class_names:
            return len(self.class_names)
        if self.category_ids is not None:
            return len(self.category_ids)
        return None

    def describe_preprocessing(self) -> str:
        """One line for reports: how an image becomes this model's input."""
        height, width = self.input_size
        scale = (
            "0..255"
            if self.scale == 1.0
            else "0..1 (/255)"
            if abs(self.scale * 255.0 - 1.0) < 1e-9
            else f"x{self.scale:.6g}"
        )
        placement = (
            f"letterbox {height}x{width} ({self.pad_align}, pad {self.pad_value:g})"
            if self.resize == "letterbox"
            else f"resize {height}x{width}"
        )
        normalised = (
            ""
            if self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0)
            else (f", mean {list(self.mean)}, std {list(self.std)}")
        )
        return f"{self.channel_order} {scale}{normalised}, {placement}, {self.layout} {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-compatible values; ``from_dict(to_dict())`` gives an equal spec."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if value is None:
                continue  # TOML has no null; an absent key means the default (None)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str | None = None,
        base: ModelSpec | None = None,
        allow_decoder_hooks: bool = True,
    ) -> ModelSpec:
        """Build a spec from parsed JSON/TOML; unknown keys are an error unless documented.

        Keys the file leaves out come from ``base`` (the spec inferred from the model, say),
        else from the decoder family's preprocessing, else from the defaults. A spec read from
        something detc did not get from the user (an artifact's manifest) passes
        ``allow_decoder_hooks=False``: its decoder must then be a registered name, never a
        ``package.module:function`` to import.
        """
        where = f" in {source}" if source else ""
        if not isinstance(data, Mapping):
            raise BadInputError(f"model spec{where} is not a table/object of keys")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in DOCUMENTED_EXTRA_KEYS:
                continue
            if key not in _FIELD_NAMES or key == "source":
                raise BadInputError(
                    f"model spec{where}: unknown key {key!r}; known keys: {', '.join(_KEYS)}"
                )
            kwargs[key] = _coerce(key, value, source)
        decoder_text = str(kwargs.get("decoder", ""))
        if not allow_decoder_hooks and ":" in decoder_text:
            raise BadInputError(
                f"model spec{where} names the decoder {decoder_text!r}, a module to import: detc "
                "runs no code that a file it was given names; pass --decoder "
                f"{decoder_text} yourself if you trust it"
            )
        if base is not None:
            return dataclasses.replace(base.with_overrides(**kwargs), source=source)
        decoder = kwargs.get("decoder", cls.decoder)
        return cls(**{**family_preprocessing(decoder), **kwargs}, source=source)

    def with_overrides(self, **flags: Any) -> ModelSpec:
        """A copy with ``flags`` applied; flags whose value is None are ignored (unset CLI flags).

        Values take the same forms as in a spec file, plus CLI-friendly strings: ``input_size``
        "640" or "480x640", ``mean``/``std``/``class_names``/``category_ids`` comma-separated.
        """
        changes: dict[str, Any] = {}
        for key, value in flags.items():
            if value is None:
                continue
            if key not in _FIELD_NAMES or key == "source":
                raise BadInputError(
                    f"model spec override: unknown key {key!r}; known keys: {', '.join(_KEYS)}"
                )
            changes[key] = _coerce(key, value, "override")
        if changes.get("decoder", self.decoder) != self.decoder:
            # a new family brings its preprocessing; fields given beside it still win
            changes = {**family_preprocessing(changes["decoder"]), **changes}
        return dataclasses.replace(self, **changes) if changes else self


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ModelSpec))
_KEYS = tuple(name for name in _FIELD_NAMES if name != "source")
_FLOAT_FIELDS = {"pad_value", "scale", "score_threshold", "iou_threshold"}
_STR_FIELDS = {"input_name", "resize", "pad_align", "channel_order", "layout", "decoder"}


def _split_text(text: str) -> list[str]:
    return [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]


def _coerce(name: str, value: Any, source: str | None = None) -> Any:
    """Check and normalise one field value; returns ``value`` itself when already normal."""
    where = f" in {source}" if source else ""

    def bad(expected: str) -> BadInputError:
        return BadInputError(f"model spec{where}: {name} = {value!r} is not {expected}")

    try:
        if name in _STR_FIELDS or name == "output_name":
            if value is None and name == "output_name":
                return None
            if not isinstance(value, str):
                raise bad("a string")
            if name in {"channel_order", "layout"}:
                return value.upper()
            if name in {"resize", "pad_align"}:
                return value.lower()
            return value
        if name == "dtype":
            if not isinstance(value, str):
                raise bad("a dtype name")
            aliases = {"fp32": "float32", "fp16": "float16", "float": "float32", "half": "float16"}
            return aliases.get(value.lower(), value.lower())
        if name in _FLOAT_FIELDS:
            if isinstance(value, bool):
                raise bad("a number")
            if isinstance(value, str) and "/" in value:  # "1/255" reads better than 0.0039
                numerator, denominator = value.split("/", 1)
                return float(numerator) / float(denominator)
            return value if type(value) is float else float(value)
        if name == "max_detections":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise bad("an integer")
            return value if type(value) is int else int(value)
        if name == "input_size":
            if isinstance(value, str):
                parts = [p for p in value.lower().replace(",", "x").split("x") if p.strip()]
                sizes = [int(p) for p in parts]
            elif isinstance(value, int) and not isinstance(value, bool):
                sizes = [value]
            elif isinstance(value, Sequence):
                sizes = [int(v) for v in value]
            else:
                raise bad("a size (640, '480x640' or [height, width])")
            if len(sizes) == 1:
                sizes = sizes * 2
            if len(sizes) != 2:
                raise bad("a size (640, '480x640' or [height, width])")
            normal = (sizes[0], sizes[1])
            return value if value == normal and isinstance(value, tuple) else normal
        if name in {"mean", "std"}:
            items = _split_text(value) if isinstance(value, str) else value
            if isinstance(items, (int, float)) and not isinstance(items, bool):
                items = [items]
            if not isinstance(items, Sequence):
                raise bad("three numbers (one per channel)")
            numbers = [float(v) for v in items]
            if len(numbers) == 1:
                numbers = numbers * 3
            if len(numbers) != 3:
                raise bad("three numbers (one per channel)")
            triple = (numbers[0], numbers[1], numbers[2])
            return value if isinstance(value, tuple) and value == triple else triple
        if name == "class_names":
            items = _split_text(value) if isinstance(value, str) else value
            if isinstance(items, Mapping):
                items = _names_from_mapping(items)
            if not isinstance(items, Sequence) or not all(isinstance(v, str) for v in items):
                raise bad("a list of class names")
            return value if isinstance(value, tuple) else tuple(items)
        if name == "category_ids":
            if value is None:
                return None
            items = _split_text(value) if isinstance(value, str) else value
            if not isinstance(items, Sequence) or isinstance(items, str):
                raise bad("a list of integer category ids")
            ids = tuple(int(v) for v in items)
            return value if isinstance(value, tuple) and value == ids else ids
    except (TypeError, ValueError) as err:
        raise bad("of the right type") from err
    raise AssertionError(f"no coercion rule for field {name}")


def _names_from_mapping(names: Mapping[Any, Any]) -> list[str]:
    """``{0: 'person', 1: 'bicycle'}`` → ['person', 'bicycle']; indices must be 0..n-1."""
    try:
        indexed = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError) as err:
        raise ValueError("class-name keys must be integers") from err
    if sorted(indexed) != list(range(len(indexed))):
        raise ValueError("class-name keys must be 0..n-1")
    return [indexed[i] for i in range(len(indexed))]


def load_spec(path: str | Path, *, base: ModelSpec | None = None) -> ModelSpec:
    """Read a spec from a ``.json`` or ``.toml`` file (flat keys, as `ModelSpec.to_dict` gives).

    Keys the file leaves out come from ``base`` when given (see :func:`spec_for_model`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"model spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"model spec {path} cannot be read: {err}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadInputError(
                f"model spec {path} is not valid JSON (line {err.lineno}: {err.msg})"
            ) from None
    elif suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise BadInputError(f"model spec {path} is not valid TOML ({err})") from None
    else:
        raise BadInputError(f"model spec {path}: use a .json or .toml file")
    return ModelSpec.from_dict(data, source=str(path), base=base)


def spec_for_model(
    model: onnx.ModelProto | str | Path, spec_path: str | Path | None = None, **overrides: Any
) -> ModelSpec:
    """The spec to use for ``model``: inferred from it, then a spec file's keys, then overrides.

    A spec file that names only the decoder keeps the model's own input size and names.
    """
    inferred = spec_from_onnx(model)
    spec = load_spec(spec_path, base=inferred) if spec_path is not None else inferred
    return spec.with_overrides(**overrides)


def write_spec(spec: ModelSpec, path: str | Path) -> Path:
    """Write ``spec`` as JSON (atomically: temp file + rename)."""
    path = Path(path)
    write_text_atomically(path, json.dumps(spec.to_dict(), indent=2) + "\n")
    return path


_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


def parse_class_names(text: str) -> tuple[str, ...]:
    """Parse a ``names`` metadata value: a Python dict literal ``{0: 'person', ...}`` or a list.

    Uses `ast.literal_eval`: metadata comes from the model file and is never executed.
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
        raise BadInputError(
            f"metadata 'names' is not a dict or list literal ({type(err).__name__})"
        ) from None
    try:
        if isinstance(value, Mapping):
            return tuple(_names_from_mapping(value))
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    except ValueError as err:
        raise BadInputError(f"metadata 'names': {err}") from None
    raise BadInputError("metadata 'names' is neither {index: name} nor a list of names")


def spec_from_onnx(model: onnx.ModelProto | str | Path, **overrides: Any) -> ModelSpec:
    """Infer a spec from an ONNX model: input name/size/layout/dtype, class names, decoder.

    Preprocessing defaults to YOLOv5's (letterbox, pad 114, RGB, 1/255); the decoder is
    ``yolov8`` when the first output is channels-first ``(1, 4+C, N)`` with C known classes,
    else ``yolov5``. ``overrides`` are applied last (see `ModelSpec.with_overrides`).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializer_names]
    if not inputs:
        raise BadInputError(f"ONNX graph {graph.name!r} has no input: nothing to feed images to")
    image_input = inputs[0]
    tensor_type = image_input.type.tensor_type
    dtype = _ONNX_DTYPES.get(tensor_type.elem_type)
    if dtype is None:
        elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise BadInputError(
            f"ONNX input {image_input.name!r} has element type {elem}: detc feeds float32 or "
            "float16 images"
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    metadata = {prop.key: prop.value for prop in model.metadata_props}

    layout = "NCHW"
    size: tuple[int, int] | None = None
    if len(dims) == 4:
        if dims[1] in (1, 3):
            layout, height, width = "NCHW", dims[2], dims[3]
        elif dims[3] in (1, 3):
            layout, height, width = "NHWC", dims[1], dims[2]
        else:
            height = width = None
        if height and width:
            size = (height, width)
    elif len(dims) != 0:
        raise BadInputError(
            f"ONNX input {image_input.name!r} has rank {len(dims)}: detc expects an image batch "
            "(N, C, H, W) or (N, H, W, C)"
        )
    if size is None:
        size = _size_from_metadata(metadata.get("imgsz")) or _DEFAULT_INPUT_SIZE

    class_names: tuple[str, ...] = ()
    if "names" in metadata:
        class_names = parse_class_names(metadata["names"])

    decoder = _guess_decoder(graph, len(class_names))
    spec = ModelSpec(
        **family_preprocessing(decoder),
        input_name=image_input.name,
        input_size=size,
        layout=layout,
        dtype=dtype,
        class_names=class_names,
        decoder=decoder,
    )
    return spec.with_overrides(**overrides)


def _size_from_metadata(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, int):
        return (value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return (value[0], value[1])
    return None


def _guess_decoder(graph: onnx.GraphProto, num_classes: int) -> str:
    if not graph.output or num_classes == 0:
        return "yolov5"
    dims = [
        d.dim_value if d.HasField("dim_value") else None
        for d in graph.output[0].type.tensor_type.shape.dim
    ]
    if len(dims) == 3 and dims[1] == 4 + num_classes and (dims[2] is None or dims[2] > dims[1]):
        return "yolov8"
    return "yolov5"
