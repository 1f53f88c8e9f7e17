"""The int8 record an artifact carries: whether a graph is quantized, the manifest's record of how
it was quantized, and the quantized reference model saved beside it.

A leaf: the driver writes what these functions read, and verification reads it back, so neither
has to import the other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import file_sha256


def is_quantized(model: Any) -> bool:
    """True for an ONNX graph (proto) holding DequantizeLinear nodes: a QDQ model."""
    return any(node.op_type == "DequantizeLinear" for node in model.graph.node)


def quantization_record(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest's record of int8 quantization (written by ``detc compile``), else None."""
    record = manifest.get("quantization")
    if not isinstance(record, dict) or record.get("mode") != "int8":
        return None
    return record


def quantized_reference_path(
    artifact_dir: str | os.PathLike[str], record: Mapping[str, Any]
) -> Path:
    """The QDQ ONNX an int8 artifact carries, checked against the sha256 the manifest states."""
    reference = record.get("reference") or {}
    path = Path(artifact_dir) / str(reference.get("file", ""))
    if not reference.get("file") or not path.is_file():
        raise BadInputError(
            f"{artifact_dir}: an int8 artifact without its quantized reference "
            f"({path.name or 'reference_qdq.onnx'}); re-run detc compile"
        )
    digest = file_sha256(path)
    if reference.get("sha256") and digest != reference["sha256"]:
        raise BadInputError(
            f"{path}: not the quantized model this artifact was compiled from (sha256 differs "
            "from the manifest's); re-run detc compile"
        )
    return path


def quantization_lines(record: Mapping[str, Any]) -> list[str]:
    """How the artifact was quantized and which layers stayed float (and why), for reports."""
    kept = record.get("kept_float") or []
    budget = record.get("max_map_drop")
    if record.get("origin") == "source":
        head = "int8: quantized before detc loaded it (QDQ source model)"
    else:
        head = (
            f"int8 by {record.get('step', 'quantize')}: {record.get('method')} ranges on "
            f"{record.get('calib_images')} calibration images"
        )
    lines = [
        head,
        f"  {record.get('quantized')} of {record.get('layers')} layers int8"
        + (f", mAP budget {budget:g} points (max_map_drop)" if budget is not None else ""),
        f"  kept in float: {len(kept) or 'none'}",
    ]
    lines += [f"    {k['name']} ({k['op_type']}): {k['reason']}" for k in kept]
    return lines
