"""Structured channel pruning: channel groups, ranking, allocation, refit."""

from __future__ import annotations

from detc.passes.prune.core import PruneOptions, PrunePass, PruneReport

__all__ = ["PruneOptions", "PrunePass", "PruneReport"]
