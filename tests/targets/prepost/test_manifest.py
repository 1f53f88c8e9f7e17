"""The manifest of an artifact with compiled pre/post-processing: what it records, what a reader
accepts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from detc.compiler.errors import BadInputError
from detc.targets.context import IMAGE_INPUT_SHAPE
from detc.targets.manifest import Manifest

DIGEST = "0" * 64


def _document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "format": "detc-artifact",
        "format_version": 1,
        "target": {"name": "x86", "tvm_target": {}},
        "library": "model.so",
        "library_sha256": DIGEST,
        "params": {"file": "params.npz", "count": 0},
        "calling_convention": "inputs",
        "inputs": [{"name": "image", "shape": list(IMAGE_INPUT_SHAPE), "dtype": "uint8"}],
        "outputs": [
            {"name": "boxes", "shape": [300, 4], "dtype": "float32"},
            {"name": "scores", "shape": [300], "dtype": "float32"},
            {"name": "classes", "shape": [300], "dtype": "int32"},
            {"name": "count", "shape": [1], "dtype": "int32"},
        ],
        "prepost": {
            "preprocess": True,
            "nms": True,
            "max_detections": 300,
            "input_size": [640, 640],
        },
    }
    document.update(changes)
    return document


def test_image_input_of_any_size_is_read_with_its_prepost_record() -> None:
    manifest = Manifest.parse(_document(), Path("manifest.json"))
    assert manifest.inputs[0].shape == ("h", "w", 3)
    assert manifest.prepost is not None and manifest.prepost.preprocess
    assert manifest.prepost.max_detections == 300
    assert manifest.prepost.input_size == (640, 640)
    assert "prepost" not in manifest.other


def test_symbolic_input_without_compiled_preprocessing_is_refused() -> None:
    document = _document()
    del document["prepost"]
    with pytest.raises(BadInputError, match="malformed shape for 'image'"):
        Manifest.parse(document, Path("manifest.json"))
    document = _document()
    document["prepost"] = {**document["prepost"], "preprocess": False}
    with pytest.raises(BadInputError, match="malformed shape"):
        Manifest.parse(document, Path("manifest.json"))


@pytest.mark.parametrize(
    "bad",
    [
        {"preprocess": "yes", "nms": True, "max_detections": 300, "input_size": [640, 640]},
        {"preprocess": True, "nms": True, "max_detections": 0, "input_size": [640, 640]},
        {"preprocess": True, "nms": True, "max_detections": 300, "input_size": [640]},
        "all",
    ],
)
def test_malformed_prepost_is_refused(bad: Any) -> None:
    document = copy.deepcopy(_document(prepost=bad))
    with pytest.raises(BadInputError, match="malformed 'prepost'"):
        Manifest.parse(document, Path("manifest.json"))
