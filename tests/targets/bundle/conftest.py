"""A tiny two-output detector-shaped model, its onnxruntime outputs, and its x86 bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.reference import ort_session, run_session
from detc.targets import TuningOptions, build_artifact, package_artifact

INPUT_SHAPE = (1, 3, 16, 16)


def tiny_detector(seed: int = 0) -> onnx.ModelProto:
    """Conv → (Sigmoid scores, Relu boxes): two outputs, weights that become params."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["scores"], name="act"),
            helper.make_node("Relu", ["c"], ["boxes"], name="relu"),
        ],
        "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 6, 16, 16]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 6, 16, 16]),
        ],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def reference_outputs(model: onnx.ModelProto, image: np.ndarray) -> dict[str, np.ndarray]:
    return run_session(ort_session(model), {"images": image})


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    return np.random.default_rng(1).random(INPUT_SHAPE, dtype=np.float32)


@pytest.fixture(scope="session")
def x86_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the plain pipeline keeps the weights in params.npz: the bundle's raw params are exercised
    out_dir = tmp_path_factory.mktemp("artifact") / "tiny-x86"
    build_artifact(
        tiny_detector(),
        "x86",
        out_dir,
        manifest_fields={},
        progress=False,
        tuning=TuningOptions(tune=False, layout="plain"),
    )
    return out_dir


@pytest.fixture(scope="session")
def x86_bundle(x86_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_artifact(x86_artifact, tmp_path_factory.mktemp("bundle") / "tiny-x86")
