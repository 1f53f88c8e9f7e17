"""What a tuned build asks of the tune phase: :class:`TuningOptions` (imports nothing of detc's
targets, so every module may take them as a typed parameter)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from detc.compiler.errors import BadInputError

#: the graph layouts a CPU target's tuned build offers (:meth:`Target.pipeline_for` maps them)
LAYOUTS = ("blocked", "plain")


@dataclass(frozen=True)
class BatchReport:
    """One measured batch of the search, as ``TuningOptions.on_batch`` hears it."""

    task: str
    measured: int
    trials_total: int
    best_ms: float | None


@dataclass(frozen=True)
class TuningOptions:
    """What ``detc compile --tune …`` / ``detc tune`` ask of the tune phase.

    Giving options at all selects a CPU target's tuned pipeline (``layout``: "blocked" is the
    NCHW[x]c layout with weights bound as constants, calling convention "inputs"; "plain" keeps
    the imported graph) and applies the tuning database. ``tune`` additionally *searches* for
    the tasks the database lacks.
    """

    tune: bool = True
    trials: int | None = None  # measured candidates in all (None: trials_per_task × tasks)
    trials_per_task: int | None = None
    minutes: float | None = None  # wall-clock budget of the search
    database: Path | None = None  # database directory (None: $DETC_CACHE_DIR/tuning)
    rpc_tracker: str | None = None  # HOST:PORT of a TVM RPC tracker
    rpc_key: str | None = None
    layout: str = "blocked"  # one of LAYOUTS
    seed: int = 0
    progress: bool = True
    #: called after every measured batch (tests simulate Ctrl-C by raising from it)
    on_batch: Callable[[BatchReport], None] | None = None

    def __post_init__(self) -> None:
        for name in ("trials", "trials_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.minutes is not None and self.minutes <= 0:
            raise BadInputError(f"--tune-minutes must be positive, got {self.minutes:g}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise BadInputError("give --rpc-tracker HOST:PORT and --rpc-key KEY together")
        if self.layout not in LAYOUTS:
            raise BadInputError(f"unknown layout {self.layout!r}; use 'blocked' or 'plain'")


def with_defaults(options: TuningOptions | None, **changes: Any) -> TuningOptions:
    return replace(options or TuningOptions(), **changes)
