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


# ---- a stand-in for `detc compile --with-preprocess --with-nms` ---------------------------------

#: the stand-in's image: (height, width, 3) uint8 RGB, the shape of the contract's `image` input
STANDIN_IMAGE_SHAPE = (24, 32, 3)
STANDIN_MAX_DETECTIONS = 8
STANDIN_CLASS_NAMES = ["red", "green", "blue"]


def standin_detector() -> onnx.ModelProto:
    """A model with the inputs and outputs of the with-preprocess/with-nms contract.

    ``image`` uint8 (H, W, 3) → the M brightest pixels (TopK, as the compiled-in NMS sorts) as
    4x4 boxes around them, their brightness / 255 as scores, their strongest channel as class;
    ``count`` the rows scoring over 0.5 (a prefix: TopK sorts), every later row zero.
    """
    height, width, _ = STANDIN_IMAGE_SHAPE
    m = STANDIN_MAX_DETECTIONS

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    node = helper.make_node
    nodes = [
        node("Cast", ["image"], ["rgb"], to=TensorProto.FLOAT),
        node("ReduceMean", ["rgb"], ["gray"], axes=[2], keepdims=0),
        node("Reshape", ["gray", "flat_shape"], ["flat"]),
        node("TopK", ["flat", "k"], ["bright", "index"], axis=0),
        node("Div", ["bright", "c255"], ["raw_scores"]),
        node("Greater", ["raw_scores", "half"], ["valid"]),
        node("Cast", ["valid"], ["valid_f"], to=TensorProto.FLOAT),
        node("Mul", ["raw_scores", "valid_f"], ["scores"]),
        node("ReduceSum", ["valid_f"], ["count_f"], keepdims=1),
        node("Cast", ["count_f"], ["count"], to=TensorProto.INT32),
        # pixel coordinates of each index: x = index mod W, y = index div W
        node("Mod", ["index", "width"], ["x_i"]),
        node("Div", ["index", "width"], ["y_i"]),
        node("Cast", ["x_i"], ["x"], to=TensorProto.FLOAT),
        node("Cast", ["y_i"], ["y"], to=TensorProto.FLOAT),
        node("Sub", ["x", "two"], ["x1"]),
        node("Sub", ["y", "two"], ["y1"]),
        node("Add", ["x", "two"], ["x2"]),
        node("Add", ["y", "two"], ["y2"]),
        node("Concat", ["x1", "y1", "x2", "y2"], ["corners"], axis=0),
        node("Reshape", ["corners", "corners_shape"], ["corners_t"]),
        node("Transpose", ["corners_t"], ["raw_boxes"], perm=[1, 0]),
        node("Unsqueeze", ["valid_f", "last_axis"], ["valid_col"]),
        node("Mul", ["raw_boxes", "valid_col"], ["boxes"]),
        # class: the strongest channel of the pixel
        node("Reshape", ["rgb", "pixels_shape"], ["pixels"]),
        node("Gather", ["pixels", "index"], ["picked"], axis=0),
        node("ArgMax", ["picked"], ["channel"], axis=1, keepdims=0),
        node("Cast", ["channel"], ["channel_i"], to=TensorProto.INT32),
        node("Cast", ["valid"], ["valid_i"], to=TensorProto.INT32),
        node("Mul", ["channel_i", "valid_i"], ["classes"]),
    ]
    initializers = [
        const("flat_shape", np.array([height * width], np.int64)),
        const("k", np.array([m], np.int64)),
        const("c255", np.array(255.0, np.float32)),
        const("half", np.array(0.5, np.float32)),
        const("width", np.array(width, np.int64)),
        const("two", np.array(2.0, np.float32)),
        const("corners_shape", np.array([4, m], np.int64)),
        const("last_axis", np.array([1], np.int64)),
        const("pixels_shape", np.array([height * width, 3], np.int64)),
    ]
    graph = helper.make_graph(
        nodes,
        "standin_with_nms",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, list(STANDIN_IMAGE_SHAPE))],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [m, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [m]),
            helper.make_tensor_value_info("classes", TensorProto.INT32, [m]),
            helper.make_tensor_value_info("count", TensorProto.INT32, [1]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def standin_image(seed: int = 2) -> np.ndarray:
    """An image with a few distinct bright pixels (unique TopK order) on a dark background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 100, STANDIN_IMAGE_SHAPE, dtype=np.uint8)
    spots = rng.choice(image.shape[0] * image.shape[1], 5, replace=False)
    for rank, spot in enumerate(spots):
        channel = rank % 3
        pixel = np.full(3, 150 - 10 * rank, np.uint8)
        pixel[channel] = 250
        image.reshape(-1, 3)[spot] = pixel
    return image


def write_ppm(path: Path, image: np.ndarray) -> Path:
    height, width, _ = image.shape
    path.write_bytes(f"P6\n{width} {height}\n255\n".encode() + image.tobytes())
    return path


def _build_standin(target: str, out_dir: Path) -> Path:
    build_artifact(
        standin_detector(),
        target,
        out_dir,
        manifest_fields={"model_spec": {"class_names": STANDIN_CLASS_NAMES}},
        progress=False,
        tuning=TuningOptions(tune=False, layout="plain"),
    )
    return out_dir


@pytest.fixture(scope="session")
def standin_x86_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_standin("x86", tmp_path_factory.mktemp("artifact") / "standin-x86")


@pytest.fixture(scope="session")
def standin_x86_bundle(
    standin_x86_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return package_artifact(standin_x86_artifact, tmp_path_factory.mktemp("bundle") / "standin-x86")
