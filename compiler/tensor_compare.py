"""Compare output tensors of two runs: max abs / max rel error and cosine similarity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from detc.compiler.tolerances import Tolerance, tolerance_for_dtype


@dataclass(frozen=True)
class TensorDiff:
    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    cosine_similarity: float
    rtol: float
    atol: float
    within_tolerance: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64 = a.astype(np.float64).ravel()
    b64 = b.astype(np.float64).ravel()
    norm = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    if norm == 0.0:
        # Two all-zero tensors agree perfectly; one all-zero tensor does not.
        return 1.0 if not a64.any() and not b64.any() else 0.0
    return float(np.dot(a64, b64) / norm)


def compare_tensor(
    name: str, actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance | None = None
) -> TensorDiff:
    """Compare ``actual`` against ``expected``; a shape mismatch is never within tolerance."""
    tol = tolerance if tolerance is not None else tolerance_for_dtype(expected.dtype)
    if actual.shape != expected.shape:
        return TensorDiff(
            name,
            tuple(actual.shape),
            str(actual.dtype),
            float("inf"),
            float("inf"),
            0.0,
            tol.rtol,
            tol.atol,
            False,
        )
    a64 = actual.astype(np.float64)
    e64 = expected.astype(np.float64)
    finite_agree = bool(np.array_equal(np.isfinite(a64), np.isfinite(e64)))
    abs_err = np.abs(a64 - e64)
    abs_err = np.where(np.isfinite(abs_err), abs_err, 0.0 if finite_agree else np.inf)
    # Relative error against the reference's magnitude, floored so near-zero outputs do not explode.
    rel_err = abs_err / np.maximum(np.abs(e64), 1e-6)
    max_abs = float(abs_err.max()) if abs_err.size else 0.0
    max_rel = float(rel_err.max()) if rel_err.size else 0.0
    ok = finite_agree and bool(np.all(abs_err <= tol.atol + tol.rtol * np.abs(e64)))
    return TensorDiff(
        name,
        tuple(actual.shape),
        str(actual.dtype),
        max_abs,
        max_rel,
        _cosine(a64, e64),
        tol.rtol,
        tol.atol,
        ok,
    )


def compare_outputs(
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    tolerance: Tolerance | None = None,
) -> list[TensorDiff]:
    """Compare every output the reference produced; a missing output counts as a mismatch."""
    diffs = []
    for name, ref in expected.items():
        if name not in actual:
            tol = tolerance if tolerance is not None else tolerance_for_dtype(ref.dtype)
            diffs.append(
                TensorDiff(
                    name, (), "missing", float("inf"), float("inf"), 0.0, tol.rtol, tol.atol, False
                )
            )
            continue
        diffs.append(compare_tensor(name, np.asarray(actual[name]), np.asarray(ref), tolerance))
    return diffs
