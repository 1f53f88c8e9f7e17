"""``detc sweep`` beyond onnxruntime: passes after the swept one (recovery) and detc's own
latency, compiled and timed interleaved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from detc.compiler.sweep import SweepResult
from tests.passes.prune.test_prune import detector


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "detector.onnx"
    onnx.save(ir.serde.serialize_model(detector(np.random.default_rng(0))), path)
    return path


def _sweep_half_the_channels(model_path: Path, **extra: Any) -> SweepResult:
    from detc.compiler.sweep import sweep

    return sweep(
        model_path,
        "prune",
        [0.5],
        option="ratio",
        pass_options="multiple=2,scope=layer",
        runs=3,
        warmup=1,
        threads=1,
        progress=False,
        **extra,
    )


def test_with_a_target_each_setting_is_compiled_and_timed_against_the_compiled_base(
    model_path: Path,
) -> None:
    result = _sweep_half_the_channels(model_path, then="eliminate-dead-code", target="x86")
    (point,) = result.points
    assert point.pipeline == "default,prune{ratio=0.5,multiple=2,scope=layer},eliminate-dead-code"
    assert point.detc_latency_ms is not None and point.detc_latency_ms > 0
    assert point.detc_base_latency_ms is not None and point.detc_base_latency_ms > 0
    assert point.detc_latency_reduction == pytest.approx(
        1 - point.detc_latency_ms / point.detc_base_latency_ms
    )
    assert result.to_dict()["target"] == "x86"
    assert "detc" in result.table().splitlines()[1]
    assert result.table().splitlines()[-1].count("ms") == 2  # onnxruntime's and detc's


def test_without_a_target_nothing_is_compiled(model_path: Path) -> None:
    result = _sweep_half_the_channels(model_path)
    (point,) = result.points
    assert point.detc_latency_ms is None and point.detc_latency_reduction is None
    assert "detc" not in result.table().splitlines()[1]


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--then", "no-such-pass"], "no-such-pass"), (["--target", "vax"], "vax")],
)
def test_a_bad_then_or_target_is_a_one_line_error_before_any_work(
    model_path: Path, flags: list[str], named: str
) -> None:
    command = [sys.executable, "-m", "detc.compiler.cli", "sweep", str(model_path)]
    command += ["--pass", "prune", "--values", "0.5", "--option", "ratio", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_calib_reaches_the_then_passes_that_read_images(model_path: Path, tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    command = [sys.executable, "-m", "detc.compiler.cli", "sweep", str(model_path)]
    command += ["--pass", "prune", "--values", "0.5", "--option", "ratio"]
    command += ["--options", "multiple=2,scope=layer,recover=false", "--calib", str(images)]
    command += ["--then", "fold-constants,quantize", "--runs", "2", "--threads", "1", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (point,) = json.loads(done.stdout)["points"]
    # quantize reads calibration images, fold-constants does not
    assert point["pipeline"].endswith(f"calib={images}}},fold-constants,quantize{{calib={images}}}")
