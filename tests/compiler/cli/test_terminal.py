"""Names from model files reach the terminal as text: no escape sequence acts on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLEAR_SCREEN = "\x1b[2J"
RETITLE = "\x1b]0;owned\x07"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _hostile_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.full((1, 4, 1, 1), 2.0, dtype=np.float32), "s")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name=f"conv{CLEAR_SCREEN}"),
        helper.make_node("Mul", ["c", "s"], ["y"], name=f"mul{RETITLE}"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [weight, scale],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_node_names_are_printed_escaped(tmp_path: Path):
    model = _hostile_model(tmp_path / "m.onnx")
    result = _cli("explain", "fold-conv-mul-add", str(model), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mul\\x1b]0;owned\\x07" in result.stdout
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\x1b" not in result.stderr


def test_a_file_name_in_an_error_is_printed_escaped(tmp_path: Path):
    result = _cli("import", f"missing{CLEAR_SCREEN}.onnx", "-o", "out.onnx", cwd=tmp_path)
    assert result.returncode == 2
    assert "\x1b" not in result.stderr and "missing\\x1b[2J.onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
