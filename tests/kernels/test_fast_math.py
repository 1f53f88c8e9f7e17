"""The vectorisable float functions of kernels/fast_math.py against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te  # noqa: E402

from detc.kernels.fast_math import exp_float32, fast_sigmoid  # noqa: E402

TARGET = {"kind": "llvm", "num-cores": 1}


def _run_elementwise(compute: object, values: np.ndarray) -> np.ndarray:
    x = te.placeholder(values.shape, "float32", name="x")
    y = compute(x)  # type: ignore[operator]
    func = te.create_prim_func([x, y])
    executable = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(TARGET))
    out = tvm.runtime.tensor(np.zeros(values.shape, np.float32))
    executable(tvm.runtime.tensor(values), out)
    return out.numpy()


def test_exp_float32_is_within_2e7_relative_and_clamps_outside_its_range() -> None:
    inside = np.linspace(-87.3, 88.3, 200_001, dtype=np.float32)
    outside = np.array([-1e30, -200.0, 200.0, 1e30], np.float32)
    values = np.concatenate([inside, outside])
    found = _run_elementwise(lambda x: te.compute(x.shape, lambda i: exp_float32(x[i])), values)
    expected = np.exp(inside.astype(np.float64))
    relative = np.abs(found[: inside.size] - expected) / expected
    assert relative.max() < 2e-7
    # clamped to the float32 bounds
    low, high = (
        np.exp(np.float32(-87.3).astype(np.float64)),
        np.exp(np.float32(88.3).astype(np.float64)),
    )
    assert np.allclose(found[inside.size :], [low, low, high, high], rtol=2e-7, atol=0)


def test_fast_sigmoid_is_within_1e7_absolute() -> None:
    values = np.linspace(-100.0, 100.0, 200_001, dtype=np.float32)
    found = _run_elementwise(fast_sigmoid, values)
    expected = 1.0 / (1.0 + np.exp(-values.astype(np.float64)))
    assert np.abs(found - expected).max() < 1e-7
