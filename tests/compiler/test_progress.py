"""Long steps show they are alive in a log too: lines with the time left, not a silent minute."""

from __future__ import annotations

import logging

import pytest

from detc.compiler import progress as progress_module
from detc.compiler.progress import progress


def test_off_a_terminal_progress_is_log_lines_with_time_left(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    monkeypatch.setenv("DETC_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="detc"):
        assert list(progress(range(4), "prune: trial cuts", "group")) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[1].startswith("prune: trial cuts: 2/4 groups, 0:00 elapsed, ~0:00 left")


def test_a_short_step_prints_nothing_in_a_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    monkeypatch.setenv("DETC_PROGRESS_SECONDS", "3600")
    with caplog.at_level(logging.INFO, logger="detc"):
        list(progress(iter(range(3)), "calibration", "image"))
    assert caplog.records == []
