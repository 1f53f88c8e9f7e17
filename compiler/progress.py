"""Progress of long steps: a bar on a terminal, a line with the time left in a log.

A step that runs for minutes must show it is alive wherever its output goes. On a terminal that is
a redrawn bar (tqdm); in a CI log a redrawn bar appends to one growing line, so there the step
logs a plain line (``detc`` logger, INFO) every ``DETC_PROGRESS_SECONDS`` seconds (default 15):
what runs, how far, the time spent and the time left. Steps shorter than the interval print
nothing in a log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

_T = TypeVar("_T")

logger = logging.getLogger("detc.progress")


def _interval() -> float:
    try:
        return max(float(os.environ.get("DETC_PROGRESS_SECONDS", "15")), 0.0)
    except ValueError:
        return 15.0


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(round(seconds), 0), 60)
    return f"{minutes}:{rest:02d}" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def on_terminal() -> bool:
    """Whether progress goes to a person (a terminal on stderr) rather than a log."""
    return sys.stderr.isatty()


def progress(
    items: Iterable[_T], desc: str, unit: str = "item", *, total: int | None = None
) -> Iterator[_T]:
    """Yield ``items``, reporting progress as a bar on a terminal or as log lines elsewhere."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if on_terminal():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, unit=unit, total=total, leave=False)
        return
    interval = _interval()
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last < interval:
            continue
        last = now
        elapsed = now - start
        if total:
            left = elapsed / done * (total - done)
            logger.info(
                "%s: %d/%d %ss, %s elapsed, ~%s left",
                desc,
                done,
                total,
                unit,
                _clock(elapsed),
                _clock(left),
            )
        else:
            logger.info("%s: %d %ss, %s elapsed", desc, done, unit, _clock(elapsed))
