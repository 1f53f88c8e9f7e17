"""The one tolerance table every numerical check in detc (and its tests) reads from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def allclose(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        return bool(np.allclose(actual, expected, rtol=self.rtol, atol=self.atol))


#: exact fp32 rewrites (fusion, folding) and fp32 compilation
FP32_EXACT = Tolerance(rtol=1e-4, atol=1e-5)
#: half-precision models and fp16 compilation
FP16 = Tolerance(rtol=1e-2, atol=1e-2)
#: integer outputs must match bit for bit
INTEGER_EXACT = Tolerance(rtol=0.0, atol=0.0)
#: what `detc verify` accepts between a compiled fp32 artifact and onnxruntime, by default
#: (different kernels sum in different orders: a deep convnet accumulates ~1e-5 relative error)
COMPILED_FP32 = Tolerance(rtol=1e-3, atol=1e-3)


def tolerance_for_dtype(dtype: np.dtype | str) -> Tolerance:
    """The tolerance an artifact is held to against onnxruntime for an output of ``dtype``."""
    kind = np.dtype(dtype)
    if kind.kind in "iub":
        return INTEGER_EXACT
    if kind == np.float16:
        return FP16
    return COMPILED_FP32
