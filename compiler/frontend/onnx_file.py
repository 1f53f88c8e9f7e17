"""ONNX files, loaded defensively, into a checked and normalised model.

ONNX files are untrusted input. Before anything parses them detc checks the size, refuses pickles,
and confines external data to the model's own folder (no absolute paths, no ``..``, no symlinks
leaving it). Then ``onnx.checker``, opset conversion into the supported range, the export idioms
of :mod:`detc.compiler.frontend.legalize`, optional static input shapes, and shape inference:
a model that shape inference proves inconsistent is refused with the node it names.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from detc.compiler.errors import BadInputError, UnsupportedModelError
from detc.compiler.fileio import file_sha256
from detc.compiler.frontend.legalize import (
    check_attributes,
    check_reshapes_follow,
    legalize,
    needs_optional_resize_inputs,
)

#: opsets detc's passes and TVM's ONNX importer are tested with; others are converted to TARGET
MIN_OPSET, MAX_OPSET, TARGET_OPSET = 11, 21, 17
#: refuse bigger files unless DETC_MAX_MODEL_BYTES says otherwise (protobuf's own limit is 2 GiB)
DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3
#: the largest size ``--input-shape`` accepts for one dimension (an image side is thousands)
MAX_DIMENSION = 2**31 - 1

PICKLE_HINT = (
    "detc never unpickles PyTorch files (a pickle can run arbitrary code): export the model "
    "with torch.export.save(...) to a .pt2 file, or to ONNX with torch.onnx.export(...)"
)


@dataclass
class LoadedModel:
    """A model ready for the pass manager, with what the manifest records about its origin."""

    model: ir.Model
    path: Path | None
    sha256: str
    metadata: dict[str, str] = field(default_factory=dict)


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["images:1x3x640x640"]`` → ``{"images": (1, 3, 640, 640)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise BadInputError(
                f"--input-shape {spec!r}: expected NAME:DxDx..., e.g. images:1x3x640x640"
            )
        sizes = tuple(int(d) for d in dims.split("x"))
        if not all(1 <= size <= MAX_DIMENSION for size in sizes):
            raise BadInputError(
                f"--input-shape {spec!r}: every size must be between 1 and {MAX_DIMENSION:,}"
            )
        shapes[name] = sizes
    return shapes


def _sniff(path: Path) -> None:
    """Refuse pickles and zip archives (torch.save checkpoints) before protobuf sees them."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        raise BadInputError(f"{path}: this is a Python pickle (a torch.save file?); {PICKLE_HINT}")
    if head.startswith(b"PK\x03\x04"):
        raise BadInputError(
            f"{path}: this is a zip archive (a torch.save checkpoint?), not ONNX; {PICKLE_HINT}"
        )


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    base = path.parent.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: initializer '{tensor.name}' has external data {location!r}"
        if "\x00" in location:
            raise BadInputError(f"{where}: a path with a NUL byte is refused")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise BadInputError(f"{where}: absolute or empty paths are refused")
        if ".." in Path(location).parts:
            raise BadInputError(f"{where}: paths leaving the model's folder are refused")
        try:
            resolved = (base / location).resolve()
            if not resolved.is_relative_to(base):
                raise BadInputError(f"{where}: it resolves outside the model's folder (a symlink?)")
            if not resolved.is_file():
                raise BadInputError(f"{where}: file not found beside the model")
            links = resolved.stat().st_nlink
        except OSError as err:
            raise BadInputError(f"{where}: it cannot be read ({err.strerror or err})") from None
        if links > 1:
            # a hard link may share its content with a file anywhere on the file system
            raise BadInputError(
                f"{where}: the file is a hard link ({links} names); refused as onnx does: "
                "store a copy of the data beside the model"
            )


def _field_values(descriptor: FieldDescriptor, value: Any) -> list[tuple[str, Any]]:
    repeated = getattr(descriptor, "is_repeated", None)
    if repeated is None:  # protobuf before 6
        repeated = descriptor.label == FieldDescriptor.LABEL_REPEATED
    if repeated:
        return [(f"{descriptor.name}[{i}]", item) for i, item in enumerate(value)]
    return [(descriptor.name, value)]


def _check_text(message: Message, path: Path, where: str = "model") -> None:
    """Refuse a model whose text (names, op types, domains, docs) is not UTF-8: protobuf hands
    such strings over as bytes, and everything after the front end expects text."""
    for descriptor, value in message.ListFields():
        if descriptor.type == FieldDescriptor.TYPE_STRING:
            for label, text in _field_values(descriptor, value):
                if isinstance(text, bytes):
                    raise BadInputError(
                        f"{path}: {where}.{label} is not UTF-8 text ({text[:40]!r}); ONNX "
                        "requires UTF-8 names: re-export the model"
                    )
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            for label, item in _field_values(descriptor, value):
                _check_text(item, path, f"{where}.{label}")


#: element types packed two to a byte
_PACKED_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
)


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a tensor whose data does not fill the shape and type it declares (a corrupt or
    hand-edited file): the ONNX checker lets it through, and whatever reads it later fails with
    an internal error."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        where = f"{path}: tensor '{tensor.name}'"
        if any(dim < 0 for dim in tensor.dims):
            raise BadInputError(f"{where} has a negative dimension {list(tensor.dims)}")
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        except (KeyError, ValueError, TypeError):
            raise BadInputError(f"{where} has an unknown element type {tensor.data_type}") from None
        count = 1
        for dim in tensor.dims:
            count *= dim
        if tensor.HasField("raw_data"):
            if tensor.data_type in _PACKED_TYPES:
                expected = (count + 1) // 2
            else:
                expected = count * dtype.itemsize
            held = len(tensor.raw_data)
        elif tensor.data_type == onnx.TensorProto.STRING:
            expected, held = count, len(tensor.string_data)
        else:
            try:
                held = onnx.numpy_helper.to_array(tensor).size
                expected = count
            except (ValueError, TypeError):
                held, expected = -1, count
        if held != expected:
            raise BadInputError(
                f"{where} declares {list(tensor.dims)} {dtype.name} but its data does not fit "
                "(a corrupt or edited file); re-export the model"
            )


def _convert_opset(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or MIN_OPSET <= opset <= MAX_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, TARGET_OPSET)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{path}: opset {opset} is outside detc's range {MIN_OPSET}–{MAX_OPSET} and could not "
            f"be converted to {TARGET_OPSET} ({str(exc).splitlines()[0]}); re-export the model "
            f"with opset {TARGET_OPSET}"
        ) from None


def _apply_input_shapes(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], path: str
) -> None:
    initializers = {i.name for i in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in initializers}
    for name, dims in shapes.items():
        if name not in inputs:
            raise BadInputError(
                f"{path}: --input-shape names '{name}', but the model's inputs are "
                f"{', '.join(inputs) or 'none'}"
            )
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise BadInputError(
                f"{path}: --input-shape {name}:{'x'.join(map(str, dims))} has {len(dims)} dims, "
                f"the input has {len(shape.dim)}"
            )
        for dim, size in zip(shape.dim, dims, strict=True):
            # A fixed size may change too: shape inference below proves that the graph follows
            # the new size, or names the node that does not.
            dim.Clear()
            dim.dim_value = size
    if shapes:
        # Shapes inferred for the old sizes would now be wrong (outputs' declared shapes too).
        del model.graph.value_info[:]
        for output in model.graph.output:
            if output.type.HasField("tensor_type"):
                output.type.tensor_type.ClearField("shape")


def _infer_shapes(model: onnx.ModelProto, path: str, reshaped: bool) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        first = " ".join(str(exc).split())
        hint = (
            "the graph's shapes do not follow the new --input-shape; export the model at that size"
            if reshaped
            else "the model is inconsistent; re-export it"
        )
        raise BadInputError(f"{path}: shape inference failed ({first}); {hint}") from None
    except Exception:  # onnx's own limits (e.g. a model over 2 GiB): passes cope without shapes
        return model


def normalize(
    model: onnx.ModelProto,
    path: str,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> onnx.ModelProto:
    """Opset into range, export idioms legalized, input shapes fixed, shapes inferred."""
    model = _convert_opset(model, path)
    try:
        graph = ir.serde.deserialize_model(model)
    except ir.serde.SerdeError as err:  # e.g. an element type no ONNX version defines
        cause: BaseException = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise BadInputError(
            f"{path}: the model is malformed ({str(cause).splitlines()[0][:200]}); re-export it"
        ) from None
    if needs_optional_resize_inputs(graph):
        with contextlib.suppress(Exception):  # unconverted, TVM's importer names the Resize
            graph = ir.serde.deserialize_model(onnx.version_converter.convert_version(model, 13))
    legalize(graph)
    check_attributes(graph, path)
    model = ir.serde.serialize_model(graph)
    if not input_shapes:
        return _infer_shapes(model, path, reshaped=False)
    _apply_input_shapes(model, input_shapes, path)
    model = _infer_shapes(model, path, reshaped=True)
    check_reshapes_follow(ir.serde.deserialize_model(model), path)
    return model


def load_onnx_proto(
    path: str | os.PathLike[str],
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int | None = None,
) -> tuple[onnx.ModelProto, str]:
    """Load, check and normalise an ONNX file; returns the proto and the file's sha256."""
    file = Path(path)
    if not file.exists():
        raise BadInputError(f"{file}: no such file")
    if not file.is_file():
        raise BadInputError(f"{file}: not a regular file")
    limit = max_bytes or int(os.environ.get("DETC_MAX_MODEL_BYTES", DEFAULT_MAX_MODEL_BYTES))
    size = file.stat().st_size
    if size > limit:
        raise BadInputError(
            f"{file}: {size:,} bytes is over the {limit:,}-byte limit; store weights as external "
            "data or raise DETC_MAX_MODEL_BYTES"
        )
    if size == 0:
        raise BadInputError(f"{file}: the file is empty")
    if file.suffix == ".pt2":
        raise BadInputError(
            f"{file}: a torch.export archive; use detc.compiler.load_pt2 / detc import"
        )
    _sniff(file)
    try:
        model = onnx.load(str(file), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BadInputError(
            f"{file}: not a valid ONNX model (protobuf parse failed: {str(exc).splitlines()[0]}); "
            "is the file truncated or of another format?"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise BadInputError(
            f"{file}: parsed as protobuf but holds no ONNX graph (not an ONNX file?)"
        )
    _check_text(model, file)
    _check_external_data(model, file)
    try:
        onnx.load_external_data_for_model(model, str(file.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"{file}: external data could not be read ({first})") from None
    _check_tensor_sizes(model, file)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInputError(
            f"{file}: the ONNX checker rejects this model ({first}); is it truncated?"
        ) from None
    sha = file_sha256(file)
    model = normalize(model, str(file), input_shapes=input_shapes)
    return model, sha


def load_onnx(
    path: str | os.PathLike[str],
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int | None = None,
) -> LoadedModel:
    """The ONNX front end: a checked, normalised model as ``onnx_ir``, with its metadata."""
    proto, sha = load_onnx_proto(path, input_shapes=input_shapes, max_bytes=max_bytes)
    metadata = {p.key: p.value for p in proto.metadata_props}
    return LoadedModel(ir.serde.deserialize_model(proto), Path(path), sha, metadata)
