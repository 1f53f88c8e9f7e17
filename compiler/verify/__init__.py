"""Verification of a compiled artifact against its reference: tensors (float and int8) and
detections (mAP and box agreement). :func:`verify_artifact` is ``detc verify`` from Python."""

from __future__ import annotations

from detc.compiler.verify.artifact import VerificationReport, verify_artifact
from detc.compiler.verify.tensors import (
    QuantizedTensorReport,
    TensorReport,
    verify_quantized_tensors,
    verify_tensors,
)

__all__ = [
    "QuantizedTensorReport",
    "TensorReport",
    "VerificationReport",
    "verify_artifact",
    "verify_quantized_tensors",
    "verify_tensors",
]
