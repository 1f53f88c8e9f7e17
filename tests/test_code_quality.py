"""House rules a reviewer would check by hand: ruff, mypy, TVM imported only where allowed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "passes", "targets", "kernels")


def test_ruff_is_clean() -> None:
    pytest.importorskip("ruff")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    pytest.importorskip("mypy")
    # The repository root is the package `detc`, and CI's clone folder may not be a valid module
    # name: explicit package bases make mypy name modules from the repository root instead.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--explicit-package-bases", *PACKAGES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_tvm_is_imported_only_in_targets_and_kernels() -> None:
    pattern = re.compile(r"^\s*(import tvm\b|from tvm\b)", re.MULTILINE)
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("compiler", "passes")
        for path in (REPO / folder).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []


def test_kernels_do_not_import_targets() -> None:
    """kernels/ is the layer below targets/: a kernel knows schedules, not databases or
    artifacts (a kernel module importing detc.targets would also make the layers circular)."""
    pattern = re.compile(r"^\s*(import detc\.targets\b|from detc\.targets\b)", re.MULTILINE)
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "kernels").rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []


def test_importing_detc_does_not_import_tvm() -> None:
    code = "import sys, detc, detc.targets, detc.passes; print('tvm' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "False", result.stderr
