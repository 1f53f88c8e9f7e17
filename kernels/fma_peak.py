"""The machine's float32 FMA peak, measured: what a tuned kernel is compared against.

Each of ``num_threads`` threads runs ``chains`` independent vector FMA chains
(``acc = acc * scale + shift``) held in registers. With enough chains to cover FMA latency ×
FMA pipes (Zen 4: 4 cycles × 2 pipes of 256 bits, so 8 ymm or 4 zmm chains; Intel with two
512-bit pipes: 8 zmm chains), the loop is bound by FMA throughput alone. Several vector widths
and chain counts are tried and the best kept, because a chip may execute 512-bit FMAs at half
rate (Zen 4 splits them into two 256-bit halves) or at full rate.

Three things made an earlier version of this probe report half the machine as "the peak":

- TVM sizes its thread pool once, from ``TVM_NUM_THREADS`` or else *half* the logical CPUs:
  one thread on a 2-core VM, so the "2-thread" loop ran both chunks on one core. The probe now
  runs in a fresh Python thread (a fresh TVM pool) sized to ``num_threads`` and refuses to report
  if TVM uses fewer threads.
- The accumulators lived in a buffer TVM allocates from its workspace inside a parallel loop,
  and ``scale``/``shift`` came from buffers that LLVM could not prove distinct from it: every FMA
  was paired with a load and a store. Now the operands are scalar arguments (registers) and the
  accumulators are vector-typed locals LLVM keeps in registers; :func:`hot_loop_report` checks
  the generated assembly (only register FMAs of the expected width in the hot loop).
- Each call did ~1 ms of work, so the thread pool's wake-up counted. Calls are now sized to
  ``seconds_per_call`` (50 ms by default) from a short calibration run.

Operands are runtime scalars (1.0, 0.999999, 1e-6: a fixed point, so values stay normal and
never become denormals) so LLVM cannot fold the recurrence at compile time.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm

#: (lanes, chains) tried by default: 8 lanes = ymm, 16 lanes = zmm on AVX-512
DEFAULT_CONFIGS: tuple[tuple[int, int], ...] = (
    (8, 8),
    (8, 12),
    (8, 16),
    (16, 8),
    (16, 12),
    (16, 16),
)
#: the x86 vector register holding ``lanes`` float32
_REGISTERS = {4: "xmm", 8: "ymm", 16: "zmm"}
#: above this clock no x86 core runs its FMA units, whatever lscpu says (the test's ceiling)
MAX_PLAUSIBLE_GHZ = 6.0


@dataclass(frozen=True)
class HotLoop:
    """The assembly of the loop that executes most FMAs."""

    fmas: int
    register_width: str  # "zmm", "ymm", "xmm", or "mixed"
    other_instructions: list[str]

    @property
    def memory_operations(self) -> list[str]:
        """Instructions in the loop that touch memory: a spill or a reload, never wanted here."""
        return [line for line in self.other_instructions if "(" in line]


def hot_loop_report(asm: str) -> HotLoop:
    """The basic block with the most ``vfmadd…ps`` instructions: their width and the rest."""
    best: list[str] = []
    block: list[str] = []
    for raw in asm.splitlines():
        line = raw.strip()
        if re.match(r"^\.?[\w.$]+:", line):  # a label starts a new block
            block = []
            continue
        if not line or line.startswith((".", "#")):
            continue
        block.append(line)
        if sum(is_fma(x) for x in block) > sum(is_fma(x) for x in best):
            best = list(block)
    fmas = [x for x in best if is_fma(x)]
    widths = {w for x in fmas for w in re.findall(r"%([xyz]mm)\d+", x)}
    width = widths.pop() if len(widths) == 1 else ("mixed" if widths else "none")
    return HotLoop(len(fmas), width, [x for x in best if not is_fma(x)])


def is_fma(line: str) -> bool:
    return bool(re.match(r"vfn?m(add|sub)\d{3}ps\b", line))


@dataclass(frozen=True)
class PeakMeasurement:
    """GFLOP/s of ``threads`` threads doing nothing but FMAs (2 flops per lane per FMA)."""

    gflops: float  # the best timed call of the best configuration
    samples: list[float]  # every timed call of that configuration, GFLOP/s
    threads: int  # what TVM's pool really used
    lanes: int
    chains: int
    single_thread_gflops: float  # the same kernel and work per thread, on one thread
    by_config: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        """Peak on ``threads`` threads over peak on one: near ``threads`` when all cores work."""
        return self.gflops / self.single_thread_gflops

    def spread(self) -> tuple[float, float, float]:
        return min(self.samples), statistics.median(self.samples), max(self.samples)

    def describe(self) -> str:
        low, median, high = self.spread()
        return (
            f"measured FMA peak {self.gflops:.1f} GFLOP/s on {self.threads} thread(s) "
            f"({self.lanes} lanes × {self.chains} chains; calls {low:.1f} / {median:.1f} / "
            f"{high:.1f} min/median/max; 1 thread {self.single_thread_gflops:.1f}, "
            f"scaling {self.scaling:.2f}×)"
        )


def fma_peak_gflops(target: tvm.target.Target, num_threads: int, **kwargs: object) -> float:
    """Best GFLOP/s of ``num_threads`` threads doing nothing but FMAs (see measure_fma_peak)."""
    return measure_fma_peak(target, num_threads, **kwargs).gflops  # type: ignore[arg-type]


def measure_fma_peak(
    target: tvm.target.Target,
    num_threads: int,
    *,
    configs: Iterable[tuple[int, int]] = DEFAULT_CONFIGS,
    seconds_per_call: float = 0.05,
    repeats: int = 7,
) -> PeakMeasurement:
    """Build each (lanes, chains) kernel, keep those whose hot loop is clean, time the best."""
    kernels = {}
    for lanes, chains in configs:
        library = peak_library(target, num_threads, lanes, chains)
        loop = hot_loop_report(library.inspect_source("asm"))
        # A spilling kernel measures loads and stores; a split one (16 lanes without AVX-512
        # gives pairs of ymm) duplicates a narrower one. Neither is the peak.
        clean = loop.fmas % chains == 0 and not loop.memory_operations
        if loop.fmas and clean and loop.register_width == _REGISTERS.get(lanes):
            kernels[(lanes, chains)] = library
    if not kernels:
        raise RuntimeError("fma_peak: no kernel kept its accumulators in registers")
    outcome: dict[str, object] = {}

    def measure() -> None:  # in a fresh Python thread: a fresh TVM pool, sized below
        try:
            outcome["result"] = _measure_in_this_thread(
                kernels, num_threads, seconds_per_call, repeats
            )
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=measure, name="fma-peak")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _measure_in_this_thread(
    kernels: dict[tuple[int, int], tvm.runtime.Module],
    num_threads: int,
    seconds_per_call: float,
    repeats: int,
) -> PeakMeasurement:
    # TVM reads TVM_NUM_THREADS when this thread's pool is created (its capacity), then
    # config_threadpool picks how many of them run; same rule as detc.targets.runtime.
    current = os.environ.get("TVM_NUM_THREADS", "")
    if not current.isdigit() or int(current) < num_threads:
        os.environ["TVM_NUM_THREADS"] = str(num_threads)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    config_threadpool = tvm.get_global_func("runtime.config_threadpool")
    config_threadpool(1, num_threads)
    used = int(tvm.runtime.num_threads())
    if used != num_threads:
        raise RuntimeError(f"fma_peak: TVM runs {used} thread(s), not the {num_threads} asked")
    out = {
        key: tvm.runtime.tensor(np.zeros((num_threads, key[1], key[0]), np.float32))
        for key in kernels
    }
    samples: dict[tuple[int, int], list[float]] = {}
    iterations: dict[tuple[int, int], int] = {}
    for key, library in kernels.items():
        iterations[key] = _calibrate(library, out[key], seconds_per_call)
        samples[key] = []
    # Round-robin over the configurations, so that a burst of load from other processes hits
    # them alike instead of deciding which one "wins".
    for _ in range(repeats):
        for key, library in kernels.items():
            samples[key] += _timed(library, out[key], iterations[key], num_threads, 1, key)
    by_config = {key: max(values) for key, values in samples.items()}
    lanes, chains = max(by_config, key=by_config.__getitem__)
    best = (lanes, chains)
    config_threadpool(1, 1)
    single = max(_timed(kernels[best], out[best], iterations[best], num_threads, repeats, best))
    config_threadpool(1, num_threads)
    if not np.all(np.isfinite(out[best].numpy())):
        raise RuntimeError("fma_peak: the accumulators are not finite")
    return PeakMeasurement(
        by_config[best], samples[best], used, lanes, chains, single, by_config=by_config
    )


_START, _SCALE, _SHIFT = 1.0, 0.999999, 1e-6


def _calibrate(library: tvm.runtime.Module, out: tvm.runtime.Tensor, seconds: float) -> int:
    iterations = 10_000
    library(_START, _SCALE, _SHIFT, iterations, out)  # warm-up: starts the thread pool
    while True:
        started = time.perf_counter()
        library(_START, _SCALE, _SHIFT, iterations, out)
        took = time.perf_counter() - started
        if took >= seconds / 4 or iterations >= 1 << 28:
            return max(iterations, int(iterations * seconds / max(took, 1e-9)))
        iterations *= 4


def _timed(
    library: tvm.runtime.Module,
    out: tvm.runtime.Tensor,
    iterations: int,
    num_threads: int,
    repeats: int,
    key: tuple[int, int],
) -> list[float]:
    """GFLOP/s of each call. The loop has ``num_threads`` chunks whatever the pool's size: on a
    one-thread pool they run in turn, so the flops per call are the same."""
    lanes, chains = key
    flops = 2.0 * num_threads * iterations * chains * lanes
    result = []
    for _ in range(repeats):
        started = time.perf_counter()
        library(_START, _SCALE, _SHIFT, iterations, out)
        result.append(flops / (time.perf_counter() - started) / 1e9)
    return result


def peak_library(
    target: tvm.target.Target, num_threads: int, lanes: int, chains: int
) -> tvm.runtime.Module:
    """The compiled kernel: ``library(start, scale, shift, iterations, out)``."""
    return tvm.tirx.build(_peak_module(num_threads, chains, lanes), target=target)


def _peak_module(num_threads: int, chains: int, lanes: int) -> tvm.IRModule:
    from tvm.script import tirx as T

    vector = f"float32x{lanes}"

    @T.prim_func(private=True)
    def peak(
        start: T.float32,
        scale: T.float32,
        shift: T.float32,
        iterations: T.int32,
        out: T.Buffer((num_threads, chains, lanes), "float32"),  # type: ignore[valid-type]
    ) -> None:
        for thread in T.parallel(num_threads):
            # One vector per element: LLVM keeps each in a register, and scalar arguments (not
            # buffers) as operands leave nothing in the loop that could alias the stores.
            acc = T.alloc_buffer((chains,), vector, scope="local")
            for j in T.unroll(chains):
                acc[j] = T.Broadcast(start, lanes)
            for _ in range(iterations):
                for j in T.unroll(chains):
                    acc[j] = acc[j] * T.Broadcast(scale, lanes) + T.Broadcast(shift, lanes)
            for j in T.unroll(chains):
                out.vstore([thread, j, 0], acc[j])

    return tvm.IRModule({"main": peak.with_attr("global_symbol", "main")})


@dataclass(frozen=True)
class TheoreticalPeak:
    """cores × GHz × FMA instructions per cycle × lanes × 2, from what lscpu reports.

    The clock is lscpu's "CPU max MHz" where the kernel knows it; a VM often shows only the
    nominal clock ("CPU MHz", the TSC rate), and the cores may boost above it, so a measured peak
    a little above this figure is not an error: :meth:`implied_ghz` says what clock it implies.
    The FMA datapath comes from the vendor and family (an upper bound where SKUs differ).
    """

    cores: int
    ghz: float
    clock_source: str
    fma_per_cycle: int
    lanes: int
    datapath: str

    @property
    def gflops(self) -> float:
        return self.at(self.ghz)

    def at(self, ghz: float) -> float:
        return self.cores * ghz * self.fma_per_cycle * self.lanes * 2.0

    def implied_ghz(self, measured_gflops: float) -> float:
        return measured_gflops / self.at(1.0)

    def describe(self) -> str:
        return (
            f"theoretical {self.gflops:.1f} GFLOP/s = {self.cores} core(s) × {self.ghz:.2f} GHz "
            f"({self.clock_source}) × {self.fma_per_cycle} FMA/cycle × {self.lanes} lanes × 2 "
            f"[{self.datapath}]"
        )


def theoretical_peak(num_threads: int, lscpu_text: str | None = None) -> TheoreticalPeak | None:
    """The float32 FMA peak of ``num_threads`` cores by the datasheet; None without FMA."""
    fields = _lscpu_fields(lscpu_text if lscpu_text is not None else _run_lscpu())
    flags = set(fields.get("Flags", "").split())
    datapath = _fma_datapath(
        fields.get("Vendor ID", ""),
        _as_int(fields.get("CPU family")),
        _as_int(fields.get("Model")),
        flags,
    )
    if datapath is None:
        return None
    pipes, bits, basis = datapath
    per_socket = _as_int(fields.get("Core(s) per socket")) or 1
    sockets = _as_int(fields.get("Socket(s)")) or 1
    cores = min(num_threads, per_socket * sockets)
    for key, source in (("CPU max MHz", "max clock"), ("CPU MHz", "nominal clock")):
        mhz = _as_float(fields.get(key))
        if mhz:
            return TheoreticalPeak(cores, mhz / 1000.0, source, pipes, bits // 32, basis)
    mhz = _cpuinfo_mhz()
    if mhz:
        return TheoreticalPeak(
            cores, mhz / 1000.0, "nominal clock, /proc/cpuinfo", pipes, bits // 32, basis
        )
    return None


def _fma_datapath(
    vendor: str, family: int | None, model: int | None, flags: set[str]
) -> tuple[int, int, str] | None:
    """(FMA pipes per core, bits per pipe, why) for the float32 FMA units."""
    if "fma" not in flags and "avx512f" not in flags:
        return None
    if vendor == "AuthenticAMD" and family == 0x19:
        return 2, 256, "AMD family 19h (Zen 3/4): 2 × 256-bit FMA pipes, AVX-512 as 2 × 256"
    if vendor == "AuthenticAMD" and family == 0x1A:
        return 2, 512, "AMD family 1Ah (Zen 5): up to 2 × 512-bit FMA pipes"
    if vendor == "AuthenticAMD" and family == 0x17 and (model or 0) < 0x30:
        return 2, 128, "AMD family 17h before Zen 2: 2 × 128-bit FMA pipes"
    if "avx512f" in flags:
        return 2, 512, "AVX-512: up to 2 × 512-bit FMA units (some SKUs have one)"
    return 2, 256, "AVX2 + FMA: 2 × 256-bit FMA units"


def _run_lscpu() -> str:
    try:
        return subprocess.run(
            ["lscpu"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        ).stdout
    except OSError:
        return ""


def _lscpu_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _cpuinfo_mhz() -> float | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def _as_int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


def _as_float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None
