"""The machine's float32 FMA peak, measured: what a tuned kernel is compared against.

Each thread runs ``chains`` independent vector FMA chains (acc = acc * a + b) kept in registers,
enough to cover the FMA latency on every port, so the loop is bound by FMA throughput alone.
The vector width comes from the target's channel block (16 lanes for AVX-512, 8 for AVX2).
"""

from __future__ import annotations

import time

import numpy as np
import tvm


def fma_peak_gflops(
    target: tvm.target.Target,
    num_threads: int,
    *,
    lanes: int = 16,
    chains: int = 16,
    iterations: int = 200_000,
    repeats: int = 5,
) -> float:
    """Best-of-``repeats`` GFLOP/s of ``num_threads`` threads doing nothing but FMAs."""
    import os

    os.environ.setdefault("TVM_NUM_THREADS", str(num_threads))
    module = _peak_module(num_threads, chains, lanes, iterations)
    library = tvm.tirx.build(module, target=target)
    a = tvm.runtime.tensor(np.full(lanes, 0.999999, np.float32))
    b = tvm.runtime.tensor(np.full(lanes, 1e-6, np.float32))
    out = tvm.runtime.tensor(np.zeros((num_threads, chains, lanes), np.float32))
    library(a, b, out)  # warm-up (thread pool start)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        library(a, b, out)
        best = min(best, time.perf_counter() - start)
    flops = 2.0 * num_threads * iterations * chains * lanes
    return flops / best / 1e9


def _peak_module(num_threads: int, chains: int, lanes: int, iterations: int) -> tvm.IRModule:
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def peak(
        scale: T.Buffer((lanes,), "float32"),  # type: ignore[valid-type]
        shift: T.Buffer((lanes,), "float32"),  # type: ignore[valid-type]
        out: T.Buffer((num_threads, chains, lanes), "float32"),  # type: ignore[valid-type]
    ) -> None:
        for thread in T.parallel(num_threads):
            acc = T.alloc_buffer((chains, lanes), "float32", scope="local")
            for j in T.unroll(chains):
                for lane in T.vectorized(lanes):
                    acc[j, lane] = T.float32(1.0)
            for _ in range(iterations):
                for j in T.unroll(chains):
                    for lane in T.vectorized(lanes):
                        acc[j, lane] = acc[j, lane] * scale[lane] + shift[lane]
            for j in T.unroll(chains):
                for lane in T.vectorized(lanes):
                    out[thread, j, lane] = acc[j, lane]

    return tvm.IRModule({"main": peak.with_attr("global_symbol", "main")})
