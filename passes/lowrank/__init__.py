"""Low-rank factorization of Gemm/MatMul and convolution weights."""

from __future__ import annotations

from detc.passes.lowrank.core import LowRankOptions, LowRankPass, LowRankReport

__all__ = ["LowRankOptions", "LowRankPass", "LowRankReport"]
