"""`detc demo`, bounded: the shipped detector compiles, verifies in mAP and boxes, and is timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detc.compiler.demo.run import demo_asset_paths, run_demo


def test_shipped_demo_asset_is_small_and_described() -> None:
    onnx_path, spec_path = demo_asset_paths()
    assert onnx_path.stat().st_size <= 10 * 1024 * 1024
    spec = json.loads(spec_path.read_text())
    assert spec["decoder"] == "demo" and spec["class_names"]
    # the figures the training run measured on its held-out split, not typed by hand
    assert spec["trained"]["map50_val"] >= 0.8


def test_demo_end_to_end_on_a_few_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETC_CACHE_DIR", str(tmp_path / "cache"))
    summary = run_demo(tmp_path / "demo", n_images=12, bench_runs=3, log=lambda _m: None)
    assert summary.tensors_ok
    assert abs(summary.map_reference - summary.map_compiled) <= 0.002
    assert summary.map50_reference > 0.5  # a trained detector, on its own kind of data
    assert summary.ort_ms > 0 and summary.detc_ms > 0 and summary.ratio > 0
    assert (summary.report / "report.md").is_file() and (summary.report / "report.json").is_file()
    assert (summary.artifact / "manifest.json").is_file()


def test_data_synth_cli_is_deterministic(tmp_path: Path) -> None:
    def make(out: Path) -> bytes:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "detc.compiler.cli",
                "data",
                "synth",
                "--n",
                "3",
                "-o",
                str(out),
                "--seed",
                "7",
                "--image-size",
                "96",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return (out / "instances.json").read_bytes()

    assert make(tmp_path / "a") == make(tmp_path / "b")
    assert len(list((tmp_path / "a" / "images").iterdir())) == 3
