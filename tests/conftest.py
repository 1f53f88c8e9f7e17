"""Shared fixtures: seeded generators, tiny models built in code, and the ../shared locator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every CLI it runs) uses a fresh detc cache, never the user's: builds read
    the tuning database there by default, so its contents must not depend on the machine."""
    cache = tmp_path_factory.mktemp("detc-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETC_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def shared_dir() -> Path:
    """../shared (real models and COCO data); tests that need it skip cleanly without it."""
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared is absent: real-model tests skipped")
    return SHARED_DIR


@pytest.fixture
def yolov5n_path(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "yolov5n.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture
def coco64_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "coco64"
    if not (path / "instances.json").is_file():
        pytest.skip(f"{path} is absent")
    return path
