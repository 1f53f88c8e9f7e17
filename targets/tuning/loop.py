"""The search loop of the tune phase: measure candidates where the network spends its time.

    search     a convolution: MetaSchedule's evolutionary search with the XGBoost cost model over
               the knobs of detc's NCHW[x]c template (kernels/conv2d_nchwc.py), one TuneContext
               per task. Everything else (copies, resizes, pools, the decode head) is
               bandwidth-bound: its few fixed variants (kernels/injective.py) are measured once.
               TVM's generic search was not used there: on YOLO's decode head it spent minutes
               simplifying index expressions per sampled schedule.
    measure    persistent builder processes (builder.py), then the local runner, or TVM's
               RPCRunner over every server registered under a tracker key

Where the trials go. The first visit of a convolution measures *seeds*: the template's default
tiles in each structural variant, a second ("square") tile shape, and the best tiles of the most
similar convolutions already
in the database, from any model (transfer within a shape family); the search starts from the
best of them. Other tasks measure their fixed variants once. After every task had its turn
(most expensive first), each next search batch goes to the convolution with the largest
``calls × best latency × 0.5^(trials / 32)``: time spent where the network spends its time,
with diminishing returns. The search stops at ``trials``, at the wall-clock budget, or when
every task is exhausted; what was measured is in the database either way, and Ctrl-C leaves it
usable (whole-line appends under a lock).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from detc.targets.tuning.options import BatchReport, TuningOptions
from detc.targets.tuning.tasks import (
    Task,
    TemplateTiles,
    conv_signature,
    default_template_schedule,
    short_name,
    slowest_tasks_table,
)

logger = logging.getLogger("detc.targets.tuning")

#: trial cap per task when --trials-per-task is not given (with a wall-clock budget, the cap is
#: high enough for the clock to decide: a 15-minute yolov5n run exhausted 64 per task at 13 min)
DEFAULT_TRIALS_PER_TASK = 64
TIMED_TRIALS_PER_TASK = 512
#: candidates per search batch of a convolution
CONV_BATCH = 16
#: seeds transferred from similar convolutions in the database (per task)
TRANSFER_SEEDS = 4
#: measured samples the XGBoost model waits for before retraining (extracting the features of
#: 16 unrolled convolution schedules took 2.7 s here, as long as measuring them)
COST_MODEL_BATCH = 48
#: trials after which a task's expected gain halves (the allocation rule above)
GAIN_HALF_LIFE = 32


@dataclass
class TuningOutcome:
    tasks: list[Task]
    trials: int = 0
    seconds: float = 0.0
    stopped_by: str = "nothing to tune"
    failures: int = 0
    table: list[str] = field(default_factory=list)


def _template_space(sch: Any) -> list[Any]:
    """ScheduleFn: one design space per structural variant of the convolution template."""
    from detc.kernels.conv2d_nchwc import VARIANTS, schedule_conv2d_nchwc

    spaces = []
    for rows_outside, inline_pad in VARIANTS:
        variant = sch.copy()
        variant.seed(sch.fork_seed())
        spaces.append(
            schedule_conv2d_nchwc(variant, rows_outside=rows_outside, inline_pad=inline_pad)
        )
    return spaces


@contextlib.contextmanager
def _without_tensor_intrinsics() -> Iterator[None]:
    """TuneContext's constructor imports ``tvm.s_tir.tensor_intrin`` (every CUDA/ROCm/ARM
    tensor intrinsic parsed from TVMScript): 67 s here, for nothing, since detc's search spaces
    never tensorize. A placeholder module stands in while contexts are made, and is removed
    again so a later real import still works."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    placeholder = types.ModuleType(name)
    placeholder.__doc__ = "placeholder installed by detc while making TuneContexts"
    sys.modules[name] = placeholder
    try:
        yield
    finally:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]


def _metaschedule_logger() -> logging.Logger:
    """MetaSchedule narrates every search step at INFO; detc's progress replaces that."""
    chatter = logging.getLogger("detc.targets.tuning.metaschedule")
    chatter.setLevel(logging.WARNING)
    return chatter


def _new_context(task: Task, target: Any, num_threads: int, seed: int) -> Any:
    from tvm.s_tir import meta_schedule as ms

    space = ms.space_generator.ScheduleFn(
        _template_space,
        sch_rules=[],
        postprocs=[ms.postproc.DisallowDynamicLoop()],
        mutator_probs={ms.mutator.MutateTileSize(): 1.0},
    )
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=32,
        init_measured_ratio=0.25,
        init_min_unmeasured=16,
        genetic_num_iters=2,
        genetic_max_fail_count=4,
    )
    with _without_tensor_intrinsics():
        return ms.TuneContext(
            mod=task.workload,
            target=target,
            space_generator=space,
            search_strategy=strategy,
            task_name=task.name,
            rand_state=seed,
            num_threads=num_threads,
            logger=_metaschedule_logger(),
        )


def _set_threads(num_threads: int) -> None:
    """Runner-worker initializer: TVM reads TVM_NUM_THREADS when its pool starts."""
    os.environ["TVM_NUM_THREADS"] = str(num_threads)
    os.environ.setdefault("TVM_BIND_THREADS", "0")


def _best_of_repeats(rt_mod: Any, device: Any, config: Any, repeated_args: Any) -> list[float]:
    """Local runner evaluator: the *minimum* over repeats. Other processes share these cores;
    the minimum is what the kernel costs, a mean also measures the neighbours."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return [min(run_evaluator_common(rt_mod, device, config, repeated_args))]


def _best_of_repeats_rpc(
    _session: Any, rt_mod: Any, device: Any, config: Any, repeated_args: Any
) -> list[float]:
    return _best_of_repeats(rt_mod, device, config, repeated_args)


def _evaluator() -> Any:
    """Timed hot, back to back. Measuring each call after flushing the weights and the output
    from the caches (closer to how a kernel finds them inside the network) was tried on yolov5n:
    the schedules it chose ran the network 2-3 % slower than those chosen hot."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=15)


def make_runner(options: TuningOptions, num_threads: int) -> tuple[Any, str]:
    """The runner and a description: local, or RPCRunner over every server under the key."""
    from tvm.s_tir import meta_schedule as ms

    if options.rpc_tracker is None:
        runner = ms.runner.LocalRunner(
            timeout_sec=60,
            evaluator_config=_evaluator(),
            f_run_evaluator=_best_of_repeats,
            initializer=functools.partial(_set_threads, num_threads),
        )
        return runner, f"local runner, {num_threads} thread(s)"
    from detc.targets.remote.session import RpcDeviceError, tracker_device, tracker_servers

    device = tracker_device(options.rpc_tracker, options.rpc_key or "")
    servers = tracker_servers(device)
    if not servers:
        raise RpcDeviceError(
            f"tracker {device.address}: no RPC server is registered under key '{device.key}'; "
            f"start one with `python -m tvm.exec.rpc_server --tracker {device.address} "
            f"--key {device.key}`"
        )
    config = ms.runner.RPCConfig(
        tracker_host=device.host,
        tracker_port=device.port,
        tracker_key=device.key,
        session_timeout_sec=120,
    )
    runner = ms.runner.RPCRunner(
        config,
        _evaluator(),
        f_run_evaluator=_best_of_repeats_rpc,
        max_workers=len(servers),
    )
    return runner, f"RPC tracker {device.address} key {device.key}, {len(servers)} server(s)"


def _shutdown_runner(runner: Any) -> None:
    pool = getattr(runner, "pool", None)
    if pool is not None:
        pool.shutdown()


class _Progress:
    """A bar per task on a terminal (trials, best latency), else a log line per batch."""

    def __init__(self, tasks: list[Task], caps: dict[str, int], enabled: bool, report: Any):
        self.enabled = enabled
        self.report = report
        self.tty = enabled and sys.stderr.isatty()
        self.caps = caps
        self.bars: dict[str, Any] = {}
        self.order = {t.key: i for i, t in enumerate(tasks)}

    def update(self, task: Task, total_trials: int, elapsed: float) -> None:
        if not self.enabled:
            return
        best = f"{task.best_s * 1e3:.3f} ms" if task.best_s else "-"
        if not self.tty:
            self.report(
                f"  [{elapsed:6.0f} s] {short_name(task.name)}: {task.trials} trials, best {best} "
                f"({total_trials} trials in all)"
            )
            return
        from tqdm import tqdm

        bar = self.bars.get(task.key)
        if bar is None:
            bar = tqdm(
                total=self.caps[task.key],
                desc=short_name(task.name, 36),
                position=len(self.bars),
                leave=True,
                unit="trial",
                dynamic_ncols=True,
            )
            self.bars[task.key] = bar
        bar.n = min(task.trials, bar.total)
        gflops = f", {task.gflops:.0f} GFLOP/s" if task.gflops else ""
        bar.set_postfix_str(f"best {best}{gflops}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class _Search:
    """Measures batches of candidates and records them (the tune loop's state)."""

    def __init__(
        self,
        tasks: list[Task],
        target: Any,
        database: Any,
        options: TuningOptions,
        num_threads: int,
        cross_compiler: str | None,
        report: Callable[[str], None],
        device_kind: str,
        tiles_for: TemplateTiles | None = None,
    ) -> None:
        from tvm.s_tir import meta_schedule as ms

        from detc.targets.builder import PersistentBuilder

        self.tasks = tasks
        self.target = target
        self.database = database
        self.options = options
        self.num_threads = num_threads
        self.report = report
        self.device_kind = device_kind
        self.tiles_for = tiles_for  # the target's default template tiles (None: AVX-512's)
        self.cost_model = ms.cost_model.XGBModel(
            num_tuning_cores=num_threads, num_warmup_samples=16, verbose_eval=0
        )
        self.builder = PersistentBuilder(max_workers=num_threads, cross_compiler=cross_compiler)
        self.runner, self.runner_text = make_runner(options, num_threads)
        self.trials = 0
        self.failures = 0
        self._unlearned: list[tuple[Task, list[Any], list[Any]]] = []
        self._signatures: dict[str, Any] = {}

    def learn(self, force: bool = False) -> None:
        """Retrain the cost model on the measurements it has not seen, in one go."""
        waiting = sum(len(candidates) for _, candidates, _ in self._unlearned)
        if waiting == 0 or (waiting < COST_MODEL_BATCH and not force):
            return
        for task, candidates, results in self._unlearned:
            self.cost_model.update(task.context, candidates, results)
        self._unlearned.clear()

    def close(self) -> None:
        self.builder.shutdown()
        _shutdown_runner(self.runner)

    # -- candidates --
    def seeds(self, task: Task) -> list[Any]:
        """Default tiles in every variant, plus the best tiles of similar convolutions."""
        import tvm
        from tvm.s_tir import meta_schedule as ms

        from detc.kernels.conv2d_nchwc import (
            VARIANTS,
            knobs_of,
            schedule_conv2d_nchwc,
            square_tiles,
        )

        args_info = ms.arg_info.ArgInfo.from_prim_func(task.workload["main"])
        default = default_template_schedule(task.workload, self.tiles_for)
        base = knobs_of(default.mod["main"]) or {}
        tiles = {k: base[k] for k in ("oc_tile", "oh_tile", "ow_tile") if k in base}
        choices = [(r, p, tiles) for r, p in VARIANTS]
        signature = conv_signature(task.workload["main"])
        if signature is not None:
            square = square_tiles(signature[3], signature[4])
            choices += [(base.get("rows_outside", 1), p, square) for p in (0, 1)]
        choices += similar_knobs(task, self.database, self.target, self._signatures)
        seen: set[str] = set()
        candidates = []
        for rows_outside, inline_pad, chosen in choices:
            sch = tvm.s_tir.Schedule(task.workload)
            try:
                schedule_conv2d_nchwc(
                    sch, rows_outside=bool(rows_outside), inline_pad=bool(inline_pad), tiles=chosen
                )
            except Exception as err:  # a transferred knob set that does not fit this shape
                logger.debug("seed %s for %s failed: %s", chosen, task.name, err)
                continue
            fingerprint = str(sch.trace)
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            candidates.append(ms.search_strategy.MeasureCandidate(sch, args_info))
        return candidates

    def generic_candidates(self, task: Task) -> list[Any]:
        """The fixed schedules of kernels/injective.py, one per variant (no search)."""
        import tvm
        from tvm.s_tir import meta_schedule as ms

        from detc.kernels.injective import VARIANTS, schedule_injective

        args_info = ms.arg_info.ArgInfo.from_prim_func(task.workload["main"])
        candidates = []
        seen: set[str] = set()
        for lanes, inline in VARIANTS:
            sch = tvm.s_tir.Schedule(task.workload)
            try:
                schedule_injective(sch, lanes=lanes, inline=inline)
            except Exception as err:  # a function this template cannot restructure
                logger.debug("variant %s/%s of %s failed: %s", lanes, inline, task.name, err)
                continue
            fingerprint = str(sch.mod)
            if fingerprint not in seen:
                seen.add(fingerprint)
                candidates.append(ms.search_strategy.MeasureCandidate(sch, args_info))
        return candidates

    def ensure_context(self, task: Task, cap: int) -> None:
        if task.context is None:
            task.context = _new_context(task, self.target, self.num_threads, self.options.seed)
            task.context.pre_tuning(
                max_trials=max(1, cap - task.trials),
                num_trials_per_iter=CONV_BATCH,
                design_spaces=task.context.generate_design_space(),
                database=self.database.memory_database(),
                cost_model=self.cost_model,
            )

    def search_batch(self, task: Task, cap: int) -> list[Any] | None:
        self.ensure_context(task, cap)
        self.learn()
        return task.context.generate_measure_candidates()

    # -- measuring --
    def measure(self, task: Task, candidates: list[Any], from_search: bool) -> None:
        from tvm.s_tir import meta_schedule as ms

        from detc.targets.builder import remove_artifact

        built = self.builder.build(
            [ms.builder.BuilderInput(c.sch.mod, self.target) for c in candidates]
        )
        runnable = [(c, b) for c, b in zip(candidates, built, strict=True) if b.error_msg is None]
        futures = self.runner.run(
            [
                ms.runner.RunnerInput(b.artifact_path, self.device_kind, c.args_info)
                for c, b in runnable
            ]
        )
        outcome = {id(c): f.result() for (c, _), f in zip(runnable, futures, strict=True)}
        results = []
        for candidate, build in zip(candidates, built, strict=True):
            if build.error_msg is not None:
                logger.debug("build failed for %s: %s", task.name, build.error_msg)
                results.append(ms.runner.RunnerResult(None, build.error_msg))
            else:
                results.append(outcome[id(candidate)])
            remove_artifact(build.artifact_path)
        self.trials += len(candidates)
        task.trials += len(candidates)
        if from_search:
            task.context.notify_runner_results(candidates, results)
        if task.context is not None:
            self._unlearned.append((task, candidates, results))
        self._record(task, candidates, results)

    def _record(self, task: Task, candidates: list[Any], results: list[Any]) -> None:
        from tvm.s_tir import meta_schedule as ms

        workload = ms.database.Workload(task.workload)
        records = []
        for candidate, result in zip(candidates, results, strict=True):
            seconds = _valid_seconds(result)
            if seconds is None:
                self.failures += 1
                logger.debug("candidate of %s failed: %s", task.name, result.error_msg)
                continue
            record = ms.database.TuningRecord(
                candidate.sch.trace,
                workload,
                [seconds],
                self.target,
                candidate.args_info,
            )
            records.append((record.as_json(), seconds))
            if task.best_s is None or seconds < task.best_s:
                task.best_s = seconds
        self.database.add(task.workload_json, records, task.workload)


def _valid_seconds(result: Any) -> float | None:
    if result.error_msg is not None or not result.run_secs:
        return None
    seconds = [float(s) for s in result.run_secs]
    best = min(seconds)
    return best if math.isfinite(best) and best > 0 else None


def similar_knobs(
    task: Task, database: Any, target: Any, signatures: dict[str, Any]
) -> list[tuple[int, int, dict[str, int]]]:
    """Knobs of the best schedules of the most similar convolutions in the database, from this
    model or any other: same kernel size and stride, nearest in channel blocks and output width.
    ``signatures`` caches :func:`conv_signature` per workload across calls."""
    from detc.kernels.conv2d_nchwc import knobs_of

    signature = conv_signature(task.workload["main"])
    if signature is None:
        return []
    memory = database.memory_database()
    ranked: list[tuple[float, str]] = []
    for key in database.workloads_with_records():
        if key == task.key:
            continue
        if key not in signatures:
            try:
                signatures[key] = conv_signature(database.workload_module(key)["main"])
            except Exception:  # a workload this TVM cannot read back: not a transfer source
                signatures[key] = None
        other = signatures[key]
        if other is None or other[:2] != signature[:2]:
            continue
        distance = sum(abs(math.log2(a / b)) for a, b in zip(signature[2:], other[2:], strict=True))
        ranked.append((distance, key))
    ranked.sort()
    knobs: list[tuple[int, int, dict[str, int]]] = []
    for _, key in ranked[:TRANSFER_SEEDS]:
        sch = memory.query_schedule(database.workload_module(key), target, workload_name="main")
        found = knobs_of(sch.mod["main"]) if sch is not None else None
        if found:
            tiles = {k: found[k] for k in ("oc_tile", "oh_tile", "ow_tile") if k in found}
            knobs.append((found.get("rows_outside", 0), found.get("inline_pad", 0), tiles))
    return knobs


def tune_tasks(
    tasks: list[Task],
    target: Any,
    database: Any,
    options: TuningOptions,
    num_threads: int,
    report: Callable[[str], None],
    *,
    cross_compiler: str | None = None,
    device_kind: str,
    tiles_for: TemplateTiles | None = None,
) -> TuningOutcome:
    """Search schedules for the tasks the database lacks, within the options' budgets;
    candidates run on a ``device_kind`` device (TVM's name: "cpu", "cuda"), the target's."""
    outcome = TuningOutcome(tasks=tasks)
    for known in tasks:
        known.best_s = database.best_seconds(known.key)
        known.from_database = known.best_s is not None
    todo = [t for t in tasks if not t.from_database]
    if not options.tune or not todo:
        outcome.stopped_by = "database had every task" if not todo else "search not requested"
        outcome.table = slowest_tasks_table(tasks)
        return outcome

    per_task = options.trials_per_task or (
        TIMED_TRIALS_PER_TASK if options.minutes is not None else DEFAULT_TRIALS_PER_TASK
    )
    caps = {t.key: per_task for t in todo}
    budget = options.trials if options.trials is not None else per_task * len(todo)
    deadline = time.monotonic() + options.minutes * 60 if options.minutes is not None else math.inf
    started = time.monotonic()
    search = _Search(
        todo, target, database, options, num_threads, cross_compiler, report, device_kind, tiles_for
    )
    report(
        f"tuning {len(todo)} task(s) ({len(tasks) - len(todo)} in the database): "
        f"budget {budget} trials"
        + (f" / {options.minutes:g} min" if options.minutes is not None else "")
        + f", {per_task} per task; {search.runner_text}"
    )
    progress = _Progress(todo, caps, options.progress, report)
    # Importance before anything is measured: FLOPs (convolutions dominate) times calls.
    first_round = sorted(todo, key=lambda t: -(t.flops + 1.0) * max(t.weight, 1))
    outcome.stopped_by = "every task exhausted"
    interrupted = _DeferredInterrupt()
    try:
        pending_first = list(first_round)
        while True:
            if interrupted.requested:
                outcome.stopped_by = "interrupted"
                break
            left = budget - search.trials
            if left <= 0 and not pending_first:
                outcome.stopped_by = "trial budget"
                break
            if time.monotonic() >= deadline:
                outcome.stopped_by = "time budget"
                break
            task: Task | None = (
                pending_first.pop(0) if pending_first else _most_promising(todo, caps)
            )
            if task is None:
                break
            # Every task is measured at least once: the first round keeps one trial for each
            # task still waiting for it, and a trial budget smaller than the tasks is exceeded.
            room = min(max(left - len(pending_first), 1), caps[task.key] - task.trials)
            if not task.templated:
                # Bandwidth-bound functions: every fixed variant once, then done (injective.py).
                candidates, from_search = search.generic_candidates(task)[:room], False
                task.exhausted = True
            elif task.trials == 0:
                search.ensure_context(task, caps[task.key])
                candidates, from_search = search.seeds(task)[:room], False
            else:
                found = search.search_batch(task, caps[task.key])
                candidates, from_search = (found or [])[:room], True
            if not candidates:
                task.exhausted = True
                continue
            search.measure(task, candidates, from_search)
            elapsed = time.monotonic() - started
            progress.update(task, search.trials, elapsed)
            if task.trials >= caps[task.key]:
                task.exhausted = True
            if options.on_batch is not None:
                options.on_batch(
                    BatchReport(
                        task.name,
                        len(candidates),
                        search.trials,
                        task.best_s * 1e3 if task.best_s else None,
                    )
                )
    finally:
        interrupted.restore()
        progress.close()
        search.close()
        outcome.trials = search.trials
        outcome.failures = search.failures
        outcome.seconds = time.monotonic() - started
    for finished in todo:
        if finished.context is not None:
            finished.context.post_tuning()
            finished.context = None
    database.compact()
    outcome.table = slowest_tasks_table(tasks)
    if interrupted.requested:
        report(f"interrupted: {outcome.trials} trials kept in {database.directory}")
        raise KeyboardInterrupt
    return outcome


class _DeferredInterrupt:
    """Ctrl-C during a search: finish the batch being measured, write it to the database, stop,
    then raise KeyboardInterrupt (the build stops; no artifact is written).

    A KeyboardInterrupt raised at an arbitrary point may land inside a Python callback that TVM's
    C++ called (the design-space function, the builder): it cannot unwind through C++ there and
    the process aborts (seen: a segfault in std::terminate). A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        self.requested = True
        self.restore()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _most_promising(tasks: list[Task], caps: dict[str, int]) -> Task | None:
    open_tasks = [t for t in tasks if not t.exhausted and t.trials < caps[t.key]]
    if not open_tasks:
        return None

    def expected_gain(task: Task) -> float:
        cost = (task.best_s or 1.0) * max(task.weight, 1)
        return cost * 0.5 ** (task.trials / GAIN_HALF_LIFE)

    return max(open_tasks, key=expected_gain)
