"""The pass registry: a broken plugin is named once and left out; the built-in passes go on."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint

import pytest

from detc.compiler import BadInputError
from detc.compiler.ir import registry


@pytest.fixture
def broken_plugin(monkeypatch: pytest.MonkeyPatch):
    broken = EntryPoint(
        name="broken-pass",
        value="detc_no_such_plugin_module:Pass",
        group=registry.ENTRY_POINT_GROUP,
    )
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken])
    registry.refresh_registry()
    yield
    registry.refresh_registry()


def test_a_broken_plugin_is_named_in_one_warning_and_left_out(
    broken_plugin: None, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="detc"):
        names = registry.all_passes()
    assert "fold-conv-bn" in names and "broken-pass" not in names
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "broken-pass" in warnings[0] and "detc_no_such_plugin_module" in warnings[0]
    assert "\n" not in warnings[0]


def test_a_pipeline_asking_for_the_broken_plugin_says_why(broken_plugin: None):
    with pytest.raises(BadInputError, match=r"plugin that could not be loaded.*failed to import"):
        registry.get_pass("broken-pass")
    assert registry.get_pass("fold-conv-bn").name == "fold-conv-bn"
