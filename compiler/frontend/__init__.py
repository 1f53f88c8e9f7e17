"""Front end: ONNX files (loaded defensively) and PyTorch models, into an ``onnx_ir`` model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from detc.compiler.errors import BadInputError
from detc.compiler.frontend.onnx_file import (
    DEFAULT_MAX_MODEL_BYTES,
    MAX_OPSET,
    MIN_OPSET,
    PICKLE_HINT,
    TARGET_OPSET,
    LoadedModel,
    file_sha256,
    load_onnx,
    load_onnx_proto,
    normalize,
    parse_input_shapes,
)
from detc.compiler.frontend.torch_export import from_torch, inspect_pt2_archive, load_pt2

_PICKLED_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")


def load_model(
    path: str | os.PathLike[str], *, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> LoadedModel:
    """Dispatch on the file type: ``.pt2`` through torch.export, anything else as ONNX."""
    file = Path(path)
    if file.suffix in _PICKLED_SUFFIXES and file.is_file():
        raise BadInputError(f"{file}: a pickled PyTorch file; {PICKLE_HINT}")
    if file.suffix == ".pt2":
        return load_pt2(file, input_shapes=input_shapes)
    return load_onnx(file, input_shapes=input_shapes)


__all__ = [
    "DEFAULT_MAX_MODEL_BYTES",
    "MAX_OPSET",
    "MIN_OPSET",
    "PICKLE_HINT",
    "TARGET_OPSET",
    "LoadedModel",
    "file_sha256",
    "from_torch",
    "inspect_pt2_archive",
    "load_model",
    "load_onnx",
    "load_onnx_proto",
    "load_pt2",
    "normalize",
    "parse_input_shapes",
]
