"""``detc tune``: the import, legalize and tune phases of a build, without a library.

How the tune phase is made, one concern per module:

    options.py   TuningOptions: what the user asks for (budgets, database, RPC tracker, layout)
    tasks.py     the tasks of a fused module, and applying the schedules found for them
    loop.py      the search loop: where the trials go, measuring, progress, Ctrl-C
    phase.py     the tune phase itself: database, search, apply, check
    database.py  the persistent tuning database;  tiles.py: the measured int8 kernel tiles
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from detc.targets.context import BuildContext
from detc.targets.target import resolve_target, run_phases
from detc.targets.tuning.database import TuningDatabase, default_database_dir
from detc.targets.tuning.options import TuningOptions

logger = logging.getLogger("detc.targets.tuning")

__all__ = ["TuneResult", "TuningOptions", "tune_model"]


@dataclass
class TuneResult:
    """What :func:`tune_model` did: the tuning manifest entry and the database it used."""

    tuning: dict[str, Any]
    database: TuningDatabase
    workloads: list[str]  # the model's task keys (for --export-db)
    table: list[str]


def tune_model(
    model: onnx.ModelProto,
    target: str,
    options: TuningOptions,
    *,
    num_threads: int | None = None,
    report: Callable[[str], None] | None = None,
    import_from: Path | None = None,
) -> TuneResult:
    """``detc tune``: the import, legalize and tune phases of a build (no library), so the
    database holds schedules for ``model`` afterwards. ``import_from`` (an exported file or a
    database directory) is merged into the database first."""
    chosen = resolve_target(target)
    threads = num_threads if num_threads is not None else chosen.default_num_threads()
    say = report or (lambda message: logger.info("%s", message))
    staging = Path(tempfile.mkdtemp(prefix="detc-tune-"))
    try:
        context = BuildContext(
            model=model,
            staging_dir=staging,
            num_threads=threads,
            progress=say,
            warn=say,
            tuning=options,
            pipeline=chosen.pipeline_for(options),
        )
        if import_from is not None:
            import tvm

            target_json = json.loads(str(tvm.target.Target(chosen.tvm_target_json(threads))))
            database = TuningDatabase(options.database or default_database_dir(), target_json)
            added = database.import_from(import_from)
            say(f"imported {added} record(s) from {import_from} into {database.directory}")
        run_phases(chosen, context, only=("import", "legalize", "tune"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    target_json = json.loads(str(context.tvm_target))
    database = TuningDatabase(options.database or default_database_dir(), target_json)
    return TuneResult(
        context.manifest["tuning"],
        database,
        list(context.manifest.get("_tuning_workloads", [])),
        list(context.manifest.get("_tuning_table", [])),
    )
