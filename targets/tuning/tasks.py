"""Tasks of the tune phase, and applying the schedules found for them.

tasks      every distinct PrimFunc of the fused module (a *workload*), with how often main
           calls it and its FLOPs
apply      the best database schedule of each task replaces its functions; a convolution the
           database lacks gets the template with default tiles. Every function that got
           neither is counted and reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: how many of the slowest tasks the final table lists
TABLE_ROWS = 12


@dataclass
class Task:
    """One distinct TIR function of the fused module."""

    name: str
    gvars: list[Any]
    workload: Any  # IRModule {"main": func} as MetaSchedule keys it
    workload_json: Any
    key: str  # structural hash
    weight: int  # calls per inference
    flops: float
    templated: bool  # a convolution detc's template schedules
    best_s: float | None = None
    trials: int = 0
    from_database: bool = False
    exhausted: bool = False
    context: Any = None  # TuneContext once the search started

    @property
    def gflops(self) -> float | None:
        return self.flops / self.best_s / 1e9 if self.best_s and self.flops else None


def call_counts(mod: Any) -> Counter[str]:
    """How often the Relax functions of ``mod`` call each TIR function, by name."""
    from tvm import relax

    counts: Counter[str] = Counter()

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            counts[expr.args[0].name_hint] += 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def extract_tasks(mod: Any) -> list[Task]:
    """Every distinct PrimFunc of ``mod`` as a task (identical functions merged, calls summed)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    from detc.kernels.conv2d_nchwc import has_conv2d_nchwc

    counts = call_counts(mod)
    by_key: dict[str, Task] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled"):
            continue
        func = _without_custom_rule_names(func)
        workload = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        workload_json = ms.database.Workload(workload).as_json()
        key = str(workload_json[0])
        weight = counts.get(gvar.name_hint, 0)
        if key in by_key:
            by_key[key].gvars.append(gvar)
            by_key[key].weight += weight
            continue
        try:
            flops = float(estimate_tir_flops(workload))
        except Exception:  # estimation is for the table only
            flops = 0.0
        by_key[key] = Task(
            name=gvar.name_hint,
            gvars=[gvar],
            workload=workload,
            workload_json=workload_json,
            key=key,
            weight=weight,
            flops=flops,
            templated=has_conv2d_nchwc(func),
        )
    return list(by_key.values())


def _without_custom_rule_names(func: Any) -> Any:
    """Drop TOPI's ``schedule_rule`` block annotations (e.g. "meta_schedule.pool_max"): no rule
    of that name exists for CPUs, and MetaSchedule warns about it for every sampled schedule."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    changed = False
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if "schedule_rule" in sch.get(block).annotations:
            sch.unannotate(block, "schedule_rule")
            changed = True
    return sch.mod["main"] if changed else func


def short_name(name: str, width: int = 40) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


#: a target's default tiles of the convolution template: (output-channel blocks, output height,
#: output width) → {"oc_tile", "oh_tile", "ow_tile"}
TemplateTiles = Callable[[int, int, int], dict[str, int]]


def default_template_schedule(workload: Any, tiles_for: TemplateTiles | None = None) -> Any:
    """The template with default tiles (no search): the schedule of an untuned convolution.
    ``tiles_for`` gives a target's own defaults (None: the AVX-512 ones, ``default_tiles``)."""
    import tvm

    from detc.kernels.conv2d_nchwc import (
        default_tiles,
        find_conv_block,
        schedule_conv2d_nchwc,
    )

    sch = tvm.s_tir.Schedule(workload)
    loops = sch.get_loops(find_conv_block(sch))
    out_blocks, out_h, out_w = (int(sch.get(loops[i]).extent) for i in (1, 2, 3))
    tiles = (
        default_tiles(out_blocks, out_w)
        if tiles_for is None
        else tiles_for(out_blocks, out_h, out_w)
    )
    return schedule_conv2d_nchwc(
        sch, rows_outside=out_h * out_w >= 1600, inline_pad=False, tiles=tiles
    )


def apply_schedules(
    mod: Any,
    tasks: list[Task],
    database: Any,
    target: Any,
    tiles_for: TemplateTiles | None = None,
) -> tuple[Any, dict]:
    """Replace each task's functions by its best database schedule (else the template default
    for a convolution, with ``tiles_for``'s tiles, or the fixed default of kernels/injective.py
    for anything else). Returns the module and counts: from_database, template_default,
    injective_default, unscheduled (functions left with TVM's default loop nests),
    untuned_tasks."""
    import tvm

    memory = database.memory_database() if database is not None else None
    with_records = database.workloads_with_records() if database is not None else set()
    updated = tvm.IRModule(mod.functions, attrs=mod.attrs)
    counts = {
        "from_database": 0,
        "template_default": 0,
        "injective_default": 0,
        "unscheduled": 0,
        "untuned_tasks": 0,
    }
    for task in tasks:
        scheduled = None
        if memory is not None and task.key in with_records:
            sch = memory.query_schedule(task.workload, target, workload_name="main")
            if sch is not None:
                scheduled = sch.mod["main"]
                counts["from_database"] += len(task.gvars)
        if scheduled is None:
            counts["untuned_tasks"] += 1
            if task.templated:
                scheduled = default_template_schedule(task.workload, tiles_for).mod["main"]
                counts["template_default"] += len(task.gvars)
            else:
                scheduled = default_injective_schedule(task.workload)
                counts["injective_default"] += len(task.gvars) if scheduled is not None else 0
        if scheduled is None:
            continue
        scheduled = scheduled.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
        for gvar in task.gvars:
            updated[gvar] = scheduled
    counts["unscheduled"] = count_unscheduled(updated)
    return updated, counts


def default_injective_schedule(workload: Any) -> Any | None:
    """A function without a template convolution, scheduled as an untuned build takes it
    (kernels/injective.py's default variant); None where TVM's own lowering is that default
    (copies, reductions) or the variant does not apply."""
    import tvm

    from detc.kernels.injective import default_variant, schedule_injective

    sch = tvm.s_tir.Schedule(workload)
    lanes, inline = default_variant(sch)
    if lanes < 0:
        return None
    try:
        schedule_injective(sch, lanes=lanes, inline=inline)
    except tvm.s_tir.ScheduleError:
        return None  # a loop nest the variant cannot restructure: TVM's own lowering stays
    return sch.mod["main"]


def count_unscheduled(mod: Any) -> int:
    """PrimFuncs that kept TVM's default loop nests (nothing scheduled them)."""
    import tvm

    return sum(
        isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled")
        for f in mod.functions.values()
    )


def conv_signature(func: Any) -> tuple[int, ...] | None:
    """(kernel h×w, stride, input channel blocks, output channel blocks, output width) of the
    template convolution in ``func``; None if it has none."""
    import tvm

    from detc.kernels.conv2d_nchwc import find_conv_block

    sch = tvm.s_tir.Schedule(func)
    block = find_conv_block(sch)
    if block is None:
        return None
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(block)]
    _, out_blocks, _, out_w, _, in_blocks, kernel_h, kernel_w, _ = extents
    data_width = int(sch.get(block).reads[0].source.shape[3])  # padded input width
    stride = max(1, (data_width - kernel_w) // max(out_w - 1, 1))
    return (kernel_h * kernel_w, stride, in_blocks, out_blocks, out_w)


def slowest_tasks_table(tasks: list[Task], rows: int = TABLE_ROWS) -> list[str]:
    """The slowest tasks by total time per inference: name, calls, share, latency, GFLOP/s."""
    timed = [t for t in tasks if t.best_s]
    total = sum(t.best_s * max(t.weight, 1) for t in timed if t.best_s)
    if not timed or total <= 0:
        return []
    untimed = len(tasks) - len(timed)
    lines = [
        f"{'task':<44} {'calls':>5} {'share':>6} {'each':>10} {'GFLOP/s':>8}",
    ]
    timed.sort(key=lambda t: -(t.best_s or 0) * max(t.weight, 1))
    for task in timed[:rows]:
        seconds = (task.best_s or 0) * max(task.weight, 1)
        gflops = f"{task.gflops:8.1f}" if task.gflops and task.flops > 1e6 else f"{'-':>8}"
        lines.append(
            f"{short_name(task.name, 44):<44} {max(task.weight, 1):>5} {seconds / total:>6.1%} "
            f"{(task.best_s or 0) * 1e3:>8.3f}ms {gflops}"
        )
    lines.append(
        f"sum of the tuned tasks: {total * 1e3:.2f} ms per inference"
        + (f" ({untimed} task(s) without a measurement)" if untimed else "")
    )
    return lines
