"""The fixed schedules of functions without a convolution: which variant an untuned build takes,
and that it computes what TVM's own lowering computes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te  # noqa: E402

from detc.kernels.injective import default_variant, schedule_injective  # noqa: E402


def _func(*tensors: Any) -> Any:
    return tvm.IRModule({"main": te.create_prim_func(list(tensors))})


def _concat() -> Any:
    a = te.placeholder((1, 4, 8, 8), name="a")
    b = te.placeholder((1, 4, 8, 8), name="b")
    out = te.compute(
        (1, 8, 8, 8),
        lambda n, c, h, w: tvm.tirx.if_then_else(c < 4, a[n, c, h, w], b[n, c - 4, h, w]),
        name="concat",
    )
    return _func(a, b, out)


def _max_pool() -> Any:
    data = te.placeholder((1, 4, 8, 8), name="data")
    ky, kx = te.reduce_axis((0, 2), "ky"), te.reduce_axis((0, 2), "kx")
    out = te.compute(
        (1, 4, 4, 4),
        lambda n, c, h, w: te.max(data[n, c, h * 2 + ky, w * 2 + kx], axis=[ky, kx]),
        name="pool",
    )
    return _func(data, out)


def _transposes() -> Any:
    """Three copy stages (reshape, transpose, reshape): TVM lowers each as a serial pass."""
    data = te.placeholder((1, 12, 4, 4), name="data")
    split = te.compute((1, 3, 4, 4, 4), lambda n, a, c, h, w: data[n, a * 4 + c, h, w], "split")
    moved = te.compute((1, 3, 4, 4, 4), lambda n, a, h, w, c: split[n, a, c, h, w], "moved")
    flat = te.compute((1, 48, 4), lambda n, r, c: moved[n, r // 16, r // 4 % 4, r % 4, c], "flat")
    return _func(data, flat)


def _scale_and_quantize() -> Any:
    data = te.placeholder((1, 4, 8, 8), name="data")
    out = te.compute(
        data.shape, lambda *i: tvm.tirx.Cast("uint8", data(*i) * 2.0 + 1.0), name="quantize"
    )
    return _func(data, out)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_concat, (-1, False)),  # a plain copy LLVM vectorises as lowered
        (_max_pool, (-1, False)),  # a reduction
        (_transposes, (0, True)),  # copies in several serial stages: inline, run in parallel
        (_scale_and_quantize, (0, True)),  # arithmetic on the data
    ],
)
def test_an_untuned_function_takes_the_variant_measured_best_for_its_kind(
    build: Any, expected: tuple[int, bool]
) -> None:
    assert default_variant(tvm.s_tir.Schedule(build())) == expected


@pytest.mark.parametrize("build", [_concat, _max_pool, _transposes, _scale_and_quantize])
def test_the_default_variant_computes_what_tvm_lowering_computes(build: Any) -> None:
    mod = build()
    sch = tvm.s_tir.Schedule(mod)
    lanes, inline = default_variant(sch)
    schedule_injective(sch, lanes=lanes, inline=inline)
    target = tvm.target.Target({"kind": "llvm"})
    infos = [(tuple(int(d) for d in b.shape), str(b.dtype)) for b in _buffers(mod["main"])]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape).astype(dtype) for shape, dtype in infos[:-1]]
    results = []
    for scheduled in (mod["main"], sch.mod["main"]):
        library = tvm.tirx.build(
            tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target
        )
        args = [tvm.runtime.tensor(x) for x in inputs]
        args.append(tvm.runtime.tensor(np.zeros(infos[-1][0], infos[-1][1])))
        library["main"](*args)
        results.append(args[-1].numpy())
    np.testing.assert_array_equal(results[0], results[1])


def _buffers(func: Any) -> list[Any]:
    from tvm.s_tir import meta_schedule as ms

    return list(ms.arg_info.ArgInfo.from_prim_func(func))
