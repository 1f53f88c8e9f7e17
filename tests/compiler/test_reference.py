"""onnxruntime as detc runs it: nothing written outside the outputs detc is asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_RUN_A_SESSION = """
import numpy as np
from onnx import TensorProto, helper
from detc.compiler.reference import ort_session, run_session

graph = helper.make_graph(
    [helper.make_node("Relu", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort_session(model)
print(run_session(session, {"x": np.array([-1.0, 2.0], dtype=np.float32)}))
"""


def test_onnxruntime_writes_nothing_under_home(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "ORT_DISABLE_TELEMETRY")
    }
    env["HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-c", _RUN_A_SESSION], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert list(home.rglob("*")) == []  # onnxruntime wrote ~/.cache/Microsoft/DeveloperTools
