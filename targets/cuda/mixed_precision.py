"""float16 arithmetic with float32 accumulation, for GPUs (which, unlike most CPUs, compute in
half precision natively and on tensor cores).

TVM's ``ToMixedPrecision(out_dtype="float32")`` computes convolutions and matrix products from
float16 operands into float32 accumulators and the elementwise operators in float16. Weights
become float16 *parameters* (stored so in params.npz, half the bytes) rather than float32 ones
cast at every run; graph inputs and outputs keep the model's types.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_mixed_precision(
    mod: Any, params: list[np.ndarray], num_inputs: int
) -> tuple[Any, list[np.ndarray], int]:
    """(module, its parameters, how many became float16) after the rewrite of ``mod``'s
    ``main``, whose arguments are ``num_inputs`` graph inputs then ``params``."""
    from tvm import relax

    weights = mod["main"].params[num_inputs:]
    names = [
        var.name for var, value in zip(weights, params, strict=True) if value.dtype == np.float32
    ]
    mod = relax.transform.ToMixedPrecision(out_dtype="float32", fp16_input_names=names)(mod)
    # the rewritten signature decides each parameter's type (a name shared by two parameters
    # must not convert the wrong one)
    converted, typed = 0, []
    for var, value in zip(mod["main"].params[num_inputs:], params, strict=True):
        wanted = np.dtype(str(var.ty.dtype))
        if wanted != value.dtype:
            converted += 1
            value = value.astype(wanted)
        typed.append(value)
    return mod, typed, converted
