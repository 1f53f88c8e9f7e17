"""PyTorch models into the front end: an ``nn.Module`` in memory, or a ``torch.export`` archive.

A ``.pt2`` archive is untrusted input like an ONNX file, and torch's own loader unpickles parts of
it (sample inputs fall back to a full unpickler; weights and constants saved with ``use_pickle``;
custom objects). detc reads an archive only after :func:`inspect_pt2_archive` has checked it: a
bounded zip (members, unpacked bytes, compression ratio, each checked while reading), weights and
constants stored as raw tensors only. While torch deserializes it, every ``torch.load`` is forced
to ``weights_only=True`` (tensors and plain containers; no code runs), so the sample inputs load
without the fallback. Nothing in the archive decides what code runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError, UnsupportedModelError
from detc.compiler.frontend.onnx_file import (
    DEFAULT_MAX_MODEL_BYTES,
    PICKLE_HINT,
    TARGET_OPSET,
    LoadedModel,
    file_sha256,
    normalize,
)

#: a .pt2 holds a handful of members per tensor; more than this is not an exported model
MAX_ARCHIVE_MEMBERS = 20_000
#: torch stores members uncompressed; a member that inflates more than this is a zip bomb
MAX_COMPRESSION_RATIO = 100
_CONFIG_SUFFIXES = (
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
)
_CONFIG_BYTES = 64 * 1024**2


def _refuse(file: Path, why: str) -> BadInputError:
    return BadInputError(f"{file}: {why}; {PICKLE_HINT}")


def _read_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file: Path) -> bytes:
    """A member's bytes, reading no more than its declared size (+1 to catch a lie)."""
    with archive.open(info) as stream:
        data = stream.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise BadInputError(f"{file}: member '{info.filename}' is not the size its header declares")
    return data


def _check_tensor_config(file: Path, name: str, raw: bytes) -> None:
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError):
        raise BadInputError(f"{file}: '{name}' is not valid JSON") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{file}: '{name}' is not a tensor table")
    for fqn, entry in config.items():
        if not isinstance(entry, dict) or entry.get("use_pickle") or not entry.get("tensor_meta"):
            raise _refuse(
                file,
                f"'{fqn}' is stored as a pickled object, not a raw tensor (detc loads no pickles)",
            )


def inspect_pt2_archive(path: Path, *, max_bytes: int | None = None) -> None:
    """Refuse an archive that is not a bounded zip of raw tensors and JSON, before torch reads it.

    Reads every member once, in bounded chunks (so a member whose header lies about its size is
    found), and never more than ``max_bytes`` in all.
    """
    limit = max_bytes or int(os.environ.get("DETC_MAX_MODEL_BYTES", DEFAULT_MAX_MODEL_BYTES))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInputError(f"{path}: not a torch.export archive (not a zip file: {exc})") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise BadInputError(
                f"{path}: {len(members):,} archive members (limit {MAX_ARCHIVE_MEMBERS:,}); "
                "not an exported model"
            )
        declared = sum(info.file_size for info in members)
        if declared > limit:
            raise BadInputError(
                f"{path}: unpacks to {declared:,} bytes, over the {limit:,}-byte limit "
                "(DETC_MAX_MODEL_BYTES)"
            )
        for info in members:
            ratio = info.file_size / max(info.compress_size, 1)
            if info.compress_type != zipfile.ZIP_STORED and ratio > MAX_COMPRESSION_RATIO:
                raise BadInputError(
                    f"{path}: member '{info.filename}' inflates {ratio:.0f}x "
                    f"(limit {MAX_COMPRESSION_RATIO}x): a zip bomb?"
                )
        if not any(info.filename.endswith("archive_format") for info in members):
            raise BadInputError(f"{path}: a zip file, but not a torch.export archive (.pt2)")
        try:
            for info in members:
                if info.filename.endswith(_CONFIG_SUFFIXES):
                    if info.file_size > _CONFIG_BYTES:
                        raise BadInputError(f"{path}: '{info.filename}' is implausibly large")
                    _check_tensor_config(path, info.filename, _read_bounded(archive, info, path))
                else:
                    _drain(archive, info, path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BadInputError(f"{path}: the archive is damaged ({exc})") from None


def _drain(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file: Path) -> None:
    """Read a member through (CRC checked), stopping at its declared size."""
    remaining = info.file_size + 1
    with archive.open(info) as stream:
        while remaining > 0:
            chunk = stream.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
    if remaining != 1:
        raise BadInputError(f"{file}: member '{info.filename}' is not the size its header declares")


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (torch's archive reader included) is ``weights_only=True``."""
    import torch

    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch's exporter warns and logs at length; detc reports failures in its own words."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "onnxscript")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _export_torch(
    program_or_module: Any,
    example_inputs: tuple[Any, ...],
    *,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    opset: int,
) -> onnx.ModelProto:
    import torch

    try:
        with _quiet_torch(), contextlib.redirect_stdout(None):
            exported = torch.onnx.export(
                program_or_module,
                example_inputs,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise UnsupportedModelError(
            f"torch.onnx.export failed: {str(exc).strip().splitlines()[0]}"
        ) from None
    if exported is None:
        raise UnsupportedModelError("torch.onnx.export returned no program")
    return exported.model_proto


def from_torch(
    module: Any,
    example_inputs: tuple[Any, ...],
    *,
    input_names: Sequence[str] | None = ("images",),
    output_names: Sequence[str] | None = None,
    opset: int = TARGET_OPSET,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> LoadedModel:
    """An ``nn.Module`` and example inputs → a checked model, via ``torch.export`` + ONNX export."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise BadInputError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    module = module.eval()
    proto = _export_torch(
        module,
        tuple(example_inputs),
        input_names=input_names,
        output_names=output_names,
        opset=opset,
    )
    digest = hashlib.sha256(proto.SerializeToString()).hexdigest()
    label = f"<{type(module).__name__}>"
    proto = normalize(proto, label, input_shapes=input_shapes)
    return LoadedModel(ir.serde.deserialize_model(proto), None, digest, {})


def load_pt2(
    path: str | os.PathLike[str],
    *,
    opset: int = TARGET_OPSET,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> LoadedModel:
    """A ``torch.export.save`` archive (.pt2) → a checked model, without unpickling anything.

    ``input_shapes`` fixes the exported model's dynamic dimensions (a dynamic batch, say), as
    ``--input-shape`` does for ONNX files.
    """
    file = Path(path)
    if not file.is_file():
        raise BadInputError(f"{file}: no such file")
    if file.suffix != ".pt2":
        raise BadInputError(f"{file}: expected a .pt2 file written by torch.export.save")
    inspect_pt2_archive(file)
    import torch

    try:
        with _weights_only_loads(), _quiet_torch():
            program = torch.export.load(str(file))
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _refuse(file, f"not a loadable torch.export archive ({message[:200]})") from None
    example = program.example_inputs[0] if program.example_inputs else None
    if example is None:
        raise BadInputError(f"{file}: the archive carries no example inputs to export with")
    proto = _export_torch(program, tuple(example), input_names=None, output_names=None, opset=opset)
    proto = normalize(proto, str(file), input_shapes=input_shapes)
    return LoadedModel(ir.serde.deserialize_model(proto), file, file_sha256(file), {})
