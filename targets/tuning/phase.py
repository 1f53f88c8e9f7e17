"""The tune phase of a target with :class:`TuningOptions`: database, search, apply, check.

    database   schedules measured before, for this CPU (database.py); a task found there is
               not searched again, so a warm rebuild runs zero trials
    search     what the database lacks, with ``options.tune`` (loop.py)
    apply      the best schedule of each task replaces its functions (tasks.py)

The phase knows the target only through :class:`TunedTarget` (its name, ISA, device kind and
linker options), so this module does not import the target it serves.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol

from detc.compiler.errors import BadInputError
from detc.targets.context import BuildContext
from detc.targets.cpu import detect_host_cpu, host_machine, missing_flags
from detc.targets.tuning.database import TuningDatabase, default_database_dir
from detc.targets.tuning.loop import tune_tasks
from detc.targets.tuning.tasks import TemplateTiles, apply_schedules, extract_tasks


class TunedTarget(Protocol):
    """What the tune phase needs of a :class:`~detc.targets.target.Target`."""

    @property
    def name(self) -> str: ...

    @property
    def machine(self) -> str: ...

    @property
    def device_kind(self) -> str: ...

    def export_options(self) -> dict[str, Any]: ...

    def conv_template_tiles(self) -> TemplateTiles | None: ...


def tune_phase(target: TunedTarget, ctx: BuildContext) -> str:
    """Tune ``ctx.mod`` for ``target`` as ``ctx.tuning`` asks; records the manifest's "tuning"."""
    options = ctx.tuning
    if options is None:
        raise ValueError("tune_phase needs TuningOptions (ctx.tuning)")
    if options.minutes is not None and ctx.searched_seconds:
        # what the int8 tile search (legalize) left of the wall-clock budget; a floor of one
        # second still measures every task once
        left = max(options.minutes - ctx.searched_seconds / 60, 1 / 60)
        options = dataclasses.replace(options, minutes=left)

    if options.tune and options.rpc_tracker is None:
        _check_measurable_here(target, ctx.tvm_target)

    target_json = json.loads(str(ctx.tvm_target))
    database = TuningDatabase(options.database or default_database_dir(), target_json)
    tasks = extract_tasks(ctx.mod)
    # a target whose vector registers differ from AVX-512's gives its own default tiles
    tiles_for = target.conv_template_tiles()
    outcome = tune_tasks(
        tasks,
        ctx.tvm_target,
        database,
        options,
        ctx.num_threads,
        ctx.progress,
        cross_compiler=target.export_options().get("cc"),
        device_kind=target.device_kind,
        tiles_for=tiles_for,
    )
    ctx.mod, counts = apply_schedules(ctx.mod, tasks, database, ctx.tvm_target, tiles_for)
    covered = [t.key for t in tasks if t.key in database.workloads_with_records()]
    ctx.manifest["tuning"] = {
        "tuned": counts["untuned_tasks"] == 0,
        "trials": outcome.trials,
        "database_digest": database.digest(covered) if covered else None,
        "untuned_tasks": counts["untuned_tasks"],
        "tasks": len(tasks),
        "functions_from_database": counts["from_database"],
        "functions_template_default": counts["template_default"],
        "functions_injective_default": counts["injective_default"],
        "functions_unscheduled": counts["unscheduled"],
        "search_seconds": round(outcome.seconds, 1),
        "stopped_by": outcome.stopped_by,
        "database": str(database.directory),
        "target_key": database.target,
        "layout": options.layout,
    }
    # For detc tune (not written to the artifact's manifest: artifact.py picks its keys).
    ctx.manifest["_tuning_workloads"] = [t.key for t in tasks]
    ctx.manifest["_tuning_table"] = outcome.table
    for line in outcome.table:
        ctx.progress(line)
    if counts["untuned_tasks"]:
        # a cross target's candidates run on a board: say how to reach one
        how = (
            "run with --tune to search for them"
            if target.machine == host_machine()
            else f"search for them on a board ({target.machine}) with --tune --rpc-tracker "
            "HOST:PORT --rpc-key KEY, or give a database tuned there with --tuning-db"
        )
        ctx.warn(
            f"partly tuned build: {counts['untuned_tasks']} of {len(tasks)} kernels are not in "
            f"the tuning database ({counts['template_default']} use the convolution template's "
            f"default tiles, {counts['injective_default']} detc's default schedule for data "
            f"movement, {counts['unscheduled']} TVM's default schedules); {how}"
        )
    return (
        f"{len(tasks) - counts['untuned_tasks']}/{len(tasks)} tasks from the database, "
        f"{outcome.trials} trials ({outcome.stopped_by})"
    )


def _check_measurable_here(target: TunedTarget, tvm_target: Any) -> None:
    """A search measures candidates on this machine unless an RPC tracker is given: refuse
    targets whose code cannot run here, before any time is spent."""
    if target.machine != host_machine():
        raise BadInputError(
            f"tuning for {target.name} measures on a {target.machine} board: give "
            "--rpc-tracker HOST:PORT --rpc-key KEY (this machine is "
            f"{host_machine()})"
        )
    mcpu = str(tvm_target.attrs.get("mcpu", "")) if hasattr(tvm_target, "attrs") else ""
    lacking = missing_flags(mcpu, detect_host_cpu().flags) if mcpu else []
    if lacking:
        raise BadInputError(
            f"tuning for {target.name} needs CPU features this machine lacks "
            f"({', '.join(lacking[:5])}): tune on such a CPU, or over --rpc-tracker"
        )
