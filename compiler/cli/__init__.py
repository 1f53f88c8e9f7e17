"""The ``detc`` command line: one module per group of verbs."""

from __future__ import annotations

from detc.compiler.cli.app import main

__all__ = ["main"]
