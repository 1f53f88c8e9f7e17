"""Verification of a compiled artifact against its reference: tensors (float and int8) and
detections (mAP and box agreement)."""

from __future__ import annotations

from detc.compiler.verify.tensors import TensorReport, verify_tensors

__all__ = ["TensorReport", "verify_tensors"]
