"""Latency, A against B on the same input and thread count, interleaved so drift hits both alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Run = Callable[[Mapping[str, np.ndarray]], Any]


@dataclass
class BenchResult:
    a_name: str
    b_name: str
    a_ms: list[float]
    b_ms: list[float]
    threads: int
    warmup: int
    order: list[str]

    @staticmethod
    def _median(xs: list[float]) -> float:
        return float(np.median(xs))

    @staticmethod
    def _p90(xs: list[float]) -> float:
        return float(np.percentile(xs, 90))

    @property
    def ratio(self) -> float:
        """median(A) / median(B): below 1.0 means A is faster."""
        return self._median(self.a_ms) / self._median(self.b_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": {
                "name": self.a_name,
                "median_ms": round(self._median(self.a_ms), 4),
                "p90_ms": round(self._p90(self.a_ms), 4),
                "runs": len(self.a_ms),
            },
            "b": {
                "name": self.b_name,
                "median_ms": round(self._median(self.b_ms), 4),
                "p90_ms": round(self._p90(self.b_ms), 4),
                "runs": len(self.b_ms),
            },
            "ratio": round(self.ratio, 4),
            "ratio_is": "median(a) / median(b)",
            "threads": self.threads,
            "warmup": self.warmup,
            "interleaved": True,
        }

    def table(self) -> str:
        rows = [
            f"{'':<28} {'median':>10} {'p90':>10}",
            *(
                f"{name[:28]:<28} {self._median(ms):>8.2f}ms {self._p90(ms):>8.2f}ms"
                for name, ms in ((self.a_name, self.a_ms), (self.b_name, self.b_ms))
            ),
            f"ratio {self.ratio:.3f}  ({self.a_name} / {self.b_name}, {self.threads} threads, "
            f"{len(self.a_ms)} interleaved runs each)",
        ]
        return "\n".join(rows)


def bench_interleaved(
    run_a: Run,
    run_b: Run,
    feeds: Mapping[str, np.ndarray],
    *,
    a_name: str = "A",
    b_name: str = "B",
    threads: int = 1,
    warmup: int = 3,
    runs: int = 20,
    progress: bool = True,
) -> BenchResult:
    """Time ``run_a`` and ``run_b`` alternately (ABBA order) after ``warmup`` runs of each.

    Alternating the order each round keeps slow drifts (thermal, other processes, cache state left
    by the previous run) from favouring whichever side always goes first.
    """
    for _ in range(warmup):
        run_a(feeds)
        run_b(feeds)
    a_ms: list[float] = []
    b_ms: list[float] = []
    order: list[str] = []
    bar = None
    started = time.perf_counter()
    for i in range(runs):
        pair = (("A", run_a, a_ms), ("B", run_b, b_ms))
        for label, fn, sink in pair if i % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            fn(feeds)
            sink.append((time.perf_counter() - t0) * 1000.0)
            order.append(label)
        # Show a bar only when the run is long enough for a user to wonder whether it hangs.
        if progress and bar is None and time.perf_counter() - started > 2.0:
            from tqdm import tqdm

            bar = tqdm(  # disable=None: only on a terminal, not in CI logs
                total=runs, initial=i + 1, desc="bench", unit="round", leave=False, disable=None
            )
        elif bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return BenchResult(a_name, b_name, a_ms, b_ms, threads, warmup, order)
