"""``detc bench ARTIFACT --vs openvino``: detc, onnxruntime fp32 and OpenVINO fp32 in one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import detc
from detc.compiler.cli import main


def _detc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    weight = rng.normal(0.0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["out"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 8, 16, 16])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, root / "tiny.onnx")
    detc.compile_model(root / "tiny.onnx", target="x86", out_dir=root / "art", progress=False)
    return root / "art"


def test_vs_openvino_times_all_three_and_reports_ratios(artifact: Path) -> None:
    pytest.importorskip("openvino")
    result = _detc("bench", str(artifact), "--vs", "openvino", "--runs", "4", "--threads", "2",
                   "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    by_name = {c["name"]: c for c in data["contestants"]}
    assert list(by_name) == ["detc", "onnxruntime", "openvino"]
    assert all(c["runs"] == 4 and c["median_ms"] > 0 for c in by_name.values())
    assert by_name["onnxruntime"]["ratio_vs_onnxruntime"] == 1.0
    assert set(data["ratios"]) == {"detc / onnxruntime", "detc / openvino"}
    ratio = by_name["detc"]["median_ms"] / by_name["openvino"]["median_ms"]
    assert data["ratios"]["detc / openvino"] == pytest.approx(ratio, rel=1e-3)
    # OpenVINO runs the artifact's float source, pinned to fp32, on the same threads
    runs_as = by_name["openvino"]["runs_as"]
    assert "reference.onnx" in runs_as and "(f32," in runs_as
    if len(os.sched_getaffinity(0)) >= 2:  # a pinned test process would pin OpenVINO too
        assert "2 threads" in runs_as
    assert data["threads"] == 2


def test_max_ratio_fails_against_a_named_contestant(artifact: Path) -> None:
    pytest.importorskip("openvino")
    result = _detc("bench", str(artifact), "--vs", "onnxruntime,openvino", "--runs", "2",
                   "--max-ratio", "1e-6")  # fmt: skip
    assert result.returncode == 1
    assert "exceeds --max-ratio" in result.stderr
    assert "detc / onnxruntime" in result.stdout or "detc / openvino" in result.stdout


def test_without_openvino_one_line_and_exit_2(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino → ImportError
    with pytest.raises(SystemExit) as exited:
        main(["bench", str(artifact), "--vs", "openvino"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install 'detc[bench]'" in err


def test_an_unknown_contestant_is_bad_input(artifact: Path) -> None:
    result = _detc("bench", str(artifact), "--vs", "onnxruntime,tensorrt", "--runs", "1")
    assert result.returncode == 2
    assert "--vs tensorrt" in result.stderr


def test_an_artifact_that_takes_images_says_how_to_time_it(artifact: Path, tmp_path: Path) -> None:
    # the manifest of a --with-preprocess build: bench has no image to give onnxruntime
    import shutil

    images = tmp_path / "images-art"
    shutil.copytree(artifact, images)
    manifest = json.loads((images / "manifest.json").read_text())
    manifest["prepost"] = {"preprocess": True, "nms": False, "max_detections": 300,
                           "input_size": [16, 16]}  # fmt: skip
    manifest["inputs"] = [{"name": "image", "shape": ["h", "w", 3], "dtype": "uint8"}]
    (images / "manifest.json").write_text(json.dumps(manifest))
    done = _detc("bench", str(images), "--runs", "2")
    assert done.returncode == 2
    assert "--with-preprocess" in done.stderr and "detc-run" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
