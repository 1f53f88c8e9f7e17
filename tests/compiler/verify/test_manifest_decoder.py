"""A decoder named by an artifact's manifest is never imported: only registered names pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from detc.compiler import BadInputError
from detc.compiler.verify.detection import _spec_for


@pytest.fixture
def payload_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    marker = tmp_path / "payload-ran"
    (tmp_path / "detc_payload_decoder.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\ndef decode(o, s):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def test_a_manifest_naming_a_module_decoder_is_refused(payload_module: Path):
    manifest = {"model_spec": {"decoder": "detc_payload_decoder:decode"}}
    with pytest.raises(BadInputError, match="runs no code"):
        _spec_for(manifest, None, None)
    assert not payload_module.exists()
    assert "detc_payload_decoder" not in sys.modules


def test_the_users_own_decoder_flag_replaces_the_manifests(payload_module: Path):
    manifest = {"model_spec": {"decoder": "detc_payload_decoder:decode"}}
    spec = _spec_for(manifest, None, "yolov5")
    assert spec.decoder == "yolov5"
    assert not payload_module.exists()


def test_a_registered_decoder_in_the_manifest_is_used():
    assert _spec_for({"model_spec": {"decoder": "yolox"}}, None, None).channel_order == "BGR"
