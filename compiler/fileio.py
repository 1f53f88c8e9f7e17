"""Where detc keeps what outlives a run: tuning databases, emulation roots, demo data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DETC_CACHE_DIR``, else ``$XDG_CACHE_HOME/detc``, else ``~/.cache/detc`` (created)."""
    explicit = os.environ.get("DETC_CACHE_DIR")
    if explicit:
        root = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "detc"
    root.mkdir(parents=True, exist_ok=True)
    return root
