"""Vectorisable activations for CPUs.

LLVM lowers ``exp`` on a vector to one libm call per lane, which made the SiLU after each
convolution of a YOLO detector cost more than the convolution itself (a 1×1 conv with SiLU went
from 2.4 ms to 0.29 ms with the polynomial below). ``topi.fast_exp`` is a range reduction plus a
polynomial, pure arithmetic that vectorises; the sigmoid built on it is within 9e-8 absolute
(3.6e-6 relative) of float64 over [-100, 100].
"""

from __future__ import annotations

from typing import Any

from tvm import te, tirx, topi


def fast_sigmoid(x: te.Tensor) -> te.Tensor:
    """1 / (1 + exp(-x)) with ``topi.fast_exp`` (float32)."""
    exp_neg = topi.fast_exp(topi.negative(x))
    one = tirx.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + exp_neg(*i)), name="sigmoid")


def legalize_sigmoid(bb: Any, call: Any) -> Any:
    """``relax.sigmoid`` → :func:`fast_sigmoid` for float32; other dtypes keep TVM's lowering."""
    from tvm.ir import Op

    if call.ty.dtype != "float32":
        return Op.get("relax.sigmoid").get_attr("FLegalize")(bb, call)
    return bb.call_te(fast_sigmoid, call.args[0], primfunc_name_hint="sigmoid")
