"""Fixtures of recover's tests: unlabeled images and the teacher's file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from PIL import Image

from tests.passes.recover._tiny import tiny_detector


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    for i in range(12):
        base = rng.uniform(0, 255, (4, 4, 3))
        pixels = np.kron(base, np.ones((10, 10, 1))) + rng.normal(0, 10, (40, 40, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.onnx"
    ir.save(tiny_detector(), path)
    return path
