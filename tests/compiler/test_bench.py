"""bench_interleaved: warm-up first, then ABBA rounds; medians, p90 and the ratio in JSON."""

from __future__ import annotations

import json

import numpy as np

from detc.compiler.bench import bench_interleaved


class _Clocked:
    """A runner that records the global call order and 'takes' a fixed time (no sleeping)."""

    def __init__(self, label: str, calls: list[str], ms: float, clock: list[float]) -> None:
        self.label, self.calls, self.ms, self.clock = label, calls, ms, clock

    def __call__(self, feeds: object) -> None:
        self.calls.append(self.label)


def test_runs_are_interleaved_abba_after_warmup() -> None:
    calls: list[str] = []
    a = _Clocked("A", calls, 1.0, [])
    b = _Clocked("B", calls, 2.0, [])
    result = bench_interleaved(a, b, {}, warmup=2, runs=4, progress=False)
    assert calls[:4] == ["A", "B", "A", "B"]  # warm-up, both sides
    assert calls[4:] == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert result.order == calls[4:]
    assert len(result.a_ms) == len(result.b_ms) == 4


def test_ratio_and_json_from_measured_times(monkeypatch) -> None:
    # A fake clock: each runner call advances time by its own cost, so the numbers are known.
    now = [0.0]
    monkeypatch.setattr("detc.compiler.bench.time.perf_counter", lambda: now[0])

    def slow(feeds: object) -> None:
        now[0] += 0.004

    def fast(feeds: object) -> None:
        now[0] += 0.002

    result = bench_interleaved(
        slow, fast, {}, a_name="slow", b_name="fast", threads=2, warmup=1, runs=6, progress=False
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["a"]["name"] == "slow" and data["b"]["name"] == "fast"
    assert np.isclose(data["a"]["median_ms"], 4.0) and np.isclose(data["b"]["median_ms"], 2.0)
    assert np.isclose(data["ratio"], 2.0)
    assert data["threads"] == 2 and data["interleaved"] is True and data["a"]["runs"] == 6
    assert "ratio 2.000" in result.table()
