"""``detc compile --with-preprocess / --with-nms``: what is refused, in one line, exit 2, before
any pass runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from detc.compiler.demo.run import demo_asset_paths


def detc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _demo_spec(tmp_path: Path, **changes: object) -> Path:
    _, spec_path = demo_asset_paths()
    spec = json.loads(spec_path.read_text())
    spec.update(changes)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_nms_with_a_custom_decoder_is_refused(tmp_path: Path) -> None:
    model, _ = demo_asset_paths()
    spec = _demo_spec(tmp_path, decoder="mypackage.heads:decode")
    result = detc(
        "compile", str(model), "--spec", str(spec), "--with-nms", "-o", str(tmp_path / "out")
    )
    line = _error_line(result)
    assert "--with-nms compiles the built-in decoders" in line and "mypackage" in line
    assert not (tmp_path / "out").exists()


def test_prepost_on_cuda_is_refused(tmp_path: Path) -> None:
    model, spec = demo_asset_paths()
    result = detc(
        "compile",
        str(model),
        "--spec",
        str(spec),
        "--target",
        "cuda",
        "--with-preprocess",
        "-o",
        str(tmp_path / "out"),
    )
    line = _error_line(result)
    assert "--with-preprocess" in line and ("not supported" in line or "cuda" in line)
    assert not (tmp_path / "out").exists()


def test_nms_without_a_spec_to_infer_is_refused(tmp_path: Path) -> None:
    """A model whose input is not an image (int64 ids): no spec can be inferred."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["out"])],
        "not-a-detector",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, [1, 8])],
    )
    path = tmp_path / "ids.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path
    )
    result = detc("compile", str(path), "--with-nms", "-o", str(tmp_path / "out"))
    line = _error_line(result)
    assert "--with-nms needs the model's preprocessing and decoder" in line
    assert "--spec" in line


def test_help_teaches_both_flags() -> None:
    result = detc("compile", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--with-preprocess" in text and "uint8 RGB image" in text
    assert "--with-nms" in text and "boxes" in text and "count" in text
