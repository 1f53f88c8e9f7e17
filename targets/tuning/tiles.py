"""Where the measured int8 tiles live: ``int8_tiles.jsonl`` in the tuning database directory.

Next to the MetaSchedule records, one JSON object per line (workload, target, tiles, seconds),
appended under the same ``flock`` discipline as :mod:`detc.targets.tuning.database`, so that
two builds can share the directory and ``--export-db`` / ``--import-db`` carry the tiles with
the records.
What is measured, and how, is :mod:`detc.kernels.int8_tiles`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import tvm

from detc.kernels import int8_tiles as tiles
from detc.kernels.conv2d_int8 import QuantizedConv2d, Tiles
from detc.kernels.int8_tiles import TileChooser, describe, workload_key
from detc.targets.runtime import configure_threads
from detc.targets.tuning.database import INT8_TILES_FILE, append_lines, locked
from detc.targets.tuning.database import target_key as database_target_key

logger = logging.getLogger("detc.targets")


def target_key(target: tvm.target.Target) -> str:
    """The CPU and code-generation options a measurement holds for."""
    config = target.export()
    wanted = ("kind", "mcpu", "mtriple", "mattr", "num-cores")
    described = {k: config[k] for k in wanted if k in config}
    return database_target_key(
        {k: list(v) if isinstance(v, list | tuple) else v for k, v in described.items()}
    )


def measuring_threads(target: tvm.target.Target) -> int:
    """The thread count the kernels are built for (``num-cores``), which measurements must
    run with: the best tile on one thread is not the best on two (yolov5n's first layer: the
    tile chosen on one thread ran 1.8x slower on two than the default)."""
    cores = target.export().get("num-cores")
    return int(cores) if cores else (os.cpu_count() or 1)


class TileDatabase:
    """``int8_tiles.jsonl`` of one tuning database directory, seen for one target.

    Entries carry the thread count they were measured with; those without one (measured on
    TVM's default pool, one thread on a 2-core x86 machine, before detc configured it) or with
    another are not used."""

    def __init__(self, directory: Path, target: tvm.target.Target) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.target = target_key(target)
        self.threads = measuring_threads(target)
        self.best: dict[str, tuple[Tiles, float]] = {}
        self.reload()

    @property
    def path(self) -> Path:
        return self.directory / INT8_TILES_FILE

    def reload(self) -> None:
        self.best = {}
        with locked(self.directory, exclusive=False):
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(entry, dict) or entry.get("target") != self.target:
                continue
            if entry.get("threads") != self.threads:
                continue
            key, tiles, seconds = entry.get("workload"), entry.get("tiles"), entry.get("run_s")
            if not isinstance(key, str) or not isinstance(tiles, dict):
                continue
            if not isinstance(seconds, int | float):
                continue
            if key not in self.best or seconds < self.best[key][1]:
                self.best[key] = (tiles, float(seconds))

    def lookup(self, workload: str) -> Tiles | None:
        found = self.best.get(workload)
        return None if found is None else dict(found[0])

    def add(self, workload: str, tiles: Tiles, seconds: float, candidates: int) -> None:
        entry = {
            "workload": workload,
            "target": self.target,
            "tiles": tiles,
            "run_s": seconds,
            "candidates": candidates,
            "threads": self.threads,
        }
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        with locked(self.directory, exclusive=True):
            append_lines(self.path, line)
        if workload not in self.best or seconds < self.best[workload][1]:
            self.best[workload] = (dict(tiles), seconds)


def tile_chooser(
    directory: Path,
    search: bool,
    *,
    device: tvm.runtime.Device,
    deadline: float = math.inf,
    on_search: Callable[[float], None] | None = None,
) -> TileChooser:
    """The lowering's schedule choice: the database's winner for the workload; when it has
    none, measured now on ``device`` (the target's, e.g. ``tvm.cpu(0)``) and recorded
    (``search``, until ``time.monotonic()`` passes ``deadline``: later workloads take the
    default and are left for the next search) or the default (None: the kernel's own).
    ``on_search`` hears the seconds each search took."""
    databases: dict[str, TileDatabase] = {}

    def choose(
        data_shape: tuple[int, ...], conv: QuantizedConv2d, target: tvm.target.Target
    ) -> Tiles | None:
        key = target_key(target)
        if key not in databases:
            databases[key] = TileDatabase(directory, target)
        database = databases[key]
        workload = workload_key(data_shape, conv)
        known = database.lookup(workload)
        if known is not None or not search:
            return known
        if time.monotonic() >= deadline:
            logger.info("int8 tiles %s: budget spent, default tile", describe(data_shape, conv))
            return None
        candidates = tiles.candidate_tiles(data_shape, conv, target)
        if len(candidates) < 2:
            return None
        started = time.monotonic()
        # TVM's pool in this (compiling) process has whatever size it started with: one
        # thread on a 2-core x86 machine unless configured
        configure_threads(database.threads)
        measured = tiles.measure_tiles(data_shape, conv, target, candidates, device=device)
        if on_search is not None:
            on_search(time.monotonic() - started)
        best, seconds = measured[0]
        database.add(workload, best, seconds, len(candidates))
        default_seconds = next(s for t, s in measured if t == candidates[0])
        logger.info(
            "int8 tiles %s: %s %.3f ms (default %.3f ms, %d candidates)",
            describe(data_shape, conv),
            best,
            seconds * 1e3,
            default_seconds * 1e3,
            len(candidates),
        )
        return best

    return choose
