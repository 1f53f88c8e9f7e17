"""Latency, A against B (or several runtimes) on the same input and thread count, interleaved so
drift hits all alike; OpenVINO as one of them when the ``bench`` extra is installed."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError

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


#: what ``pip`` installs OpenVINO with, for the error when it is absent
OPENVINO_EXTRA = "pip install 'detc[bench]'"


@dataclass
class RoundRobinResult:
    """Latency of several runtimes timed in turn on the same input, rotating the order."""

    ms: dict[str, list[float]]  # by contestant, in the order given
    threads: int
    warmup: int
    order: list[str]
    #: the contestant every other is divided by (median / median): onnxruntime fp32
    baseline: str
    notes: dict[str, str] = field(default_factory=dict)  # by contestant: what exactly ran

    def median(self, name: str) -> float:
        return float(np.median(self.ms[name]))

    def p90(self, name: str) -> float:
        return float(np.percentile(self.ms[name], 90))

    def ratio(self, a: str, b: str) -> float:
        """median(a) / median(b): below 1.0 means ``a`` is faster."""
        return self.median(a) / self.median(b)

    def to_dict(self, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        return {
            "contestants": [
                {
                    "name": name,
                    "median_ms": round(self.median(name), 4),
                    "p90_ms": round(self.p90(name), 4),
                    "runs": len(ms),
                    f"ratio_vs_{self.baseline}": round(self.ratio(name, self.baseline), 4),
                    **({"runs_as": self.notes[name]} if name in self.notes else {}),
                }
                for name, ms in self.ms.items()
            ],
            "ratios": {f"{a} / {b}": round(self.ratio(a, b), 4) for a, b in pairs},
            "ratio_is": "median / median",
            "threads": self.threads,
            "warmup": self.warmup,
            "interleaved": True,
        }

    def table(self, pairs: list[tuple[str, str]]) -> str:
        width = max(28, *(len(n) for n in self.ms))
        rows = [f"{'':<{width}} {'median':>10} {'p90':>10} {'/ ' + self.baseline:>16}"]
        rows += [
            f"{name:<{width}} {self.median(name):>8.2f}ms {self.p90(name):>8.2f}ms "
            f"{self.ratio(name, self.baseline):>16.3f}"
            for name in self.ms
        ]
        rows += [f"ratio {self.ratio(a, b):.3f}  ({a} / {b})" for a, b in pairs]
        runs = len(next(iter(self.ms.values())))
        rows.append(f"{self.threads} threads, {runs} runs each, order rotated every round")
        rows += [f"{name}: {note}" for name, note in self.notes.items()]
        return "\n".join(rows)


def bench_round_robin(
    runners: Mapping[str, Run],
    feeds: Mapping[str, np.ndarray],
    *,
    baseline: str,
    threads: int = 1,
    warmup: int = 3,
    runs: int = 20,
    progress: bool = True,
) -> RoundRobinResult:
    """Time every runner once per round, after ``warmup`` rounds.

    Round ``i`` runs the contestants rotated by ``i // 2`` and reversed on odd rounds, so each
    one takes each position equally often (every ``2 × len(runners)`` rounds); with three, six
    rounds visit all six orders, so each also follows each other one equally often. What ran
    just before matters (caches, a pool still spinning), and this keeps it from favouring anyone.
    """
    names = list(runners)
    if baseline not in runners:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    for _ in range(warmup):
        for name in names:
            runners[name](feeds)
    ms: dict[str, list[float]] = {name: [] for name in names}
    order: list[str] = []
    bar = None
    started = time.perf_counter()
    for i in range(runs):
        shift = (i // 2) % len(names)
        turn = names[shift:] + names[:shift]
        for name in turn if i % 2 == 0 else turn[::-1]:
            t0 = time.perf_counter()
            runners[name](feeds)
            ms[name].append((time.perf_counter() - t0) * 1000.0)
            order.append(name)
        if progress and bar is None and time.perf_counter() - started > 2.0:
            from tqdm import tqdm

            bar = tqdm(
                total=runs, initial=i + 1, desc="bench", unit="round", leave=False, disable=None
            )
        elif bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return RoundRobinResult(ms, threads, warmup, order, baseline)


def require_openvino() -> Any:
    """The ``openvino`` module, or the one-line error (exit 2) saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise BadInputError(
            f"--vs openvino needs OpenVINO, which is not installed: {OPENVINO_EXTRA}"
        ) from None
    return openvino


@dataclass(frozen=True)
class OpenVinoRunner:
    run: Run
    note: str  # what runs: version, model, precision, threads
    #: what OpenVINO really uses: fewer than asked when this process may run on fewer CPUs
    #: (its affinity, e.g. a thread pool that pinned it)
    threads: int


def openvino_runner(
    model: str | os.PathLike[str], input_shapes: Mapping[str, tuple[int, ...]], threads: int
) -> OpenVinoRunner:
    """OpenVINO's CPU plugin on a float ONNX model, in fp32, latency mode, ``threads`` threads.

    fp32 is asked for explicitly: on a CPU with AVX-512 BF16 or AMX (Zen 4, Sapphire Rapids)
    OpenVINO's default inference precision is bfloat16, which is not the float network.
    """
    ov = require_openvino()
    core = ov.Core()
    network = core.read_model(os.fspath(model))
    names = {port.get_any_name() for port in network.inputs}
    if names != set(input_shapes):
        raise BadInputError(
            f"{model}: inputs {sorted(names)} do not match the artifact's {sorted(input_shapes)}: "
            "is this the model the artifact was compiled from?"
        )
    network.reshape({name: ov.PartialShape(list(shape)) for name, shape in input_shapes.items()})
    compiled = core.compile_model(
        network,
        "CPU",
        {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    request = compiled.create_infer_request()
    outputs = [port.get_any_name() for port in compiled.outputs]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = request.infer(dict(feeds))
        return {name: result[port] for name, port in zip(outputs, compiled.outputs, strict=True)}

    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    used = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    note = (
        f"OpenVINO {ov.get_version().split('-')[0]} CPU plugin, {model} ({precision}, "
        f"PERFORMANCE_HINT=LATENCY, {used} threads)"
    )
    return OpenVinoRunner(run, note, used)
