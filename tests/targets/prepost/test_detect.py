"""Compiled decode + class-aware NMS (and letterbox) against detc's Python path, per decoder
family, on tiny detectors built in code."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from detc.compiler.detection.spec import ModelSpec
from detc.compiler.reference import ort_session, run_session
from detc.compiler.verify.prepost import compare_on_images
from detc.targets import load_artifact
from detc.targets.artifact import build_artifact
from detc.targets.context import PrepostRequest

INPUT = 32  # strides 8, 16, 32: 16 + 4 + 1 = 21 rows
CLASSES = 3


def _tiny_detector(family: str, seed: int) -> onnx.ModelProto:
    """Three strided convolutions (one per YOLO level) over a 32x32 image, their rows
    concatenated (21 rows), laid out and activated as ``family``'s head exports them."""
    rng = np.random.default_rng(seed)
    columns = CLASSES + (4 if family == "yolov8" else 5)
    nodes, initializers, levels = [], [], []
    for stride in (8, 16, 32):
        weight = rng.normal(0.0, 0.02, (columns, 3, stride, stride)).astype(np.float32)
        bias = rng.normal(0.0, 1.0, columns).astype(np.float32)
        initializers += [
            onnx.numpy_helper.from_array(weight, f"w{stride}"),
            onnx.numpy_helper.from_array(bias, f"b{stride}"),
        ]
        nodes.append(
            helper.make_node(
                "Conv",
                ["images", f"w{stride}", f"b{stride}"],
                [f"c{stride}"],
                kernel_shape=[stride, stride],
                strides=[stride, stride],
                name=f"conv{stride}",
            )
        )
        cells = (INPUT // stride) ** 2
        initializers.append(
            onnx.numpy_helper.from_array(np.array([1, columns, cells], np.int64), f"s{stride}")
        )
        nodes.append(helper.make_node("Reshape", [f"c{stride}", f"s{stride}"], [f"r{stride}"]))
        levels.append(f"r{stride}")
    nodes.append(helper.make_node("Concat", levels, ["channels"], axis=2))  # (1, K, 21)
    if family == "yolox-logits":
        nodes.append(helper.make_node("Transpose", ["channels"], ["output0"], perm=[0, 2, 1]))
    elif family == "yolox":
        nodes.append(helper.make_node("Transpose", ["channels"], ["rows"], perm=[0, 2, 1]))
        nodes.append(helper.make_node("Sigmoid", ["rows"], ["output0"]))
    else:
        # boxes in pixels (cx, cy, w, h spread over the image), probabilities after
        scale = np.ones((1, columns, 1), np.float32)
        scale[0, :4, 0] = [INPUT, INPUT, INPUT / 2, INPUT / 2]
        initializers.append(onnx.numpy_helper.from_array(scale, "scale"))
        nodes.append(helper.make_node("Sigmoid", ["channels"], ["probabilities"]))
        target = "output0" if family == "yolov8" else "scaled"
        nodes.append(helper.make_node("Mul", ["probabilities", "scale"], [target]))
        if family != "yolov8":
            nodes.append(helper.make_node("Transpose", ["scaled"], ["output0"], perm=[0, 2, 1]))
    rows = 21
    shape = [1, columns, rows] if family == "yolov8" else [1, rows, columns]
    graph = helper.make_graph(
        nodes,
        family,
        [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, INPUT, INPUT])],
        [helper.make_tensor_value_info("output0", onnx.TensorProto.FLOAT, shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def _spec(family: str) -> ModelSpec:
    return ModelSpec(
        input_size=(INPUT, INPUT),
        decoder=family,
        class_names=("a", "b", "c"),
        score_threshold=0.2,
        iou_threshold=0.45,
        max_detections=8,
    )


def _images(seed: int) -> list[tuple[str, np.ndarray]]:
    """Smooth random images: exactly the input, smaller, odd, portrait, landscape."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in [(32, 32), (17, 23), (97, 41), (41, 97), (33, 31)]:
        coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
        rows = np.linspace(0, 3, height).round().astype(int)
        cols = np.linspace(0, 3, width).round().astype(int)
        image = coarse[rows][:, cols] + rng.normal(0, 20, (height, width, 3))
        images.append((f"{height}x{width}", np.clip(image, 0, 255).astype(np.uint8)))
    return images


def _build(tmp_path: Path, family: str, preprocess: bool, nms: bool) -> tuple[Any, Any, ModelSpec]:
    model = _tiny_detector(family, seed=len(family))
    spec = _spec(family)
    out = tmp_path / f"{family}-{int(preprocess)}{int(nms)}"
    manifest = build_artifact(
        model,
        "x86",
        out,
        manifest_fields={"model_spec": spec.to_dict()},
        progress=False,
        report=lambda _message: None,
        prepost=PrepostRequest(preprocess, nms, spec),
    )
    session = ort_session(model, threads=1)
    return manifest, (load_artifact(out), lambda feeds: run_session(session, feeds)), spec


@pytest.mark.parametrize("family", ["yolov5", "yolov8", "yolox", "yolox-logits"])
def test_compiled_detections_are_pythons(tmp_path: Path, family: str) -> None:
    manifest, (artifact, reference), spec = _build(tmp_path, family, True, True)
    assert manifest["prepost"] == {
        "preprocess": True,
        "nms": True,
        "max_detections": 8,
        "input_size": [32, 32],
    }
    assert [o["name"] for o in manifest["outputs"]] == ["boxes", "scores", "classes", "count"]
    comparison = compare_on_images(
        manifest["prepost"], spec, reference, artifact.run, _images(seed=3)
    )
    found = sum(image.candidate_count for image in comparison.images)
    assert found > 0, "the tiny detector must detect something for the test to mean anything"
    for image in comparison.images:
        assert image.identical_lists, image.describe()
        # Pillow differs by one level on a few pixels of some two-axis shrinks (97x41 here):
        # scores move in the 4th decimal there, and by float rounding elsewhere
        assert image.max_score_diff < 1e-3, image.describe()


def test_nms_alone_keeps_model_input_pixels_and_pads_with_zeros(tmp_path: Path) -> None:
    manifest, (artifact, reference), spec = _build(tmp_path, "yolov5", False, True)
    assert [i["name"] for i in manifest["inputs"]] == ["images"]
    comparison = compare_on_images(
        manifest["prepost"], spec, reference, artifact.run, _images(seed=4)
    )
    assert all(image.identical_lists for image in comparison.images)
    tensor = np.random.default_rng(5).uniform(0, 1, (1, 3, INPUT, INPUT)).astype(np.float32)
    outputs = artifact.run({"images": tensor})
    count = int(outputs["count"][0])
    assert 0 <= count <= spec.max_detections
    assert not outputs["boxes"][count:].any() and not outputs["scores"][count:].any()
    assert outputs["classes"].dtype == np.int32 and outputs["count"].shape == (1,)


def test_preprocess_alone_returns_the_network_outputs(tmp_path: Path) -> None:
    manifest, (artifact, reference), spec = _build(tmp_path, "yolov8", True, False)
    assert manifest["inputs"] == [{"name": "image", "shape": ["h", "w", 3], "dtype": "uint8"}]
    assert [o["name"] for o in manifest["outputs"]] == ["output0"]
    comparison = compare_on_images(
        manifest["prepost"], spec, reference, artifact.run, _images(seed=6)
    )
    assert all(image.identical_lists for image in comparison.images)


def test_equal_scores_keep_the_lower_index_first(tmp_path: Path) -> None:
    """Ties in score are broken by row order, as np.argsort(kind="stable") breaks them."""
    spec = dataclasses.replace(_spec("yolov5"), score_threshold=0.1)
    model = _tiny_detector("yolov5", seed=0)
    # every weight zero: all rows carry the same score, boxes from the bias alone
    for tensor in model.graph.initializer:
        if tensor.name.startswith("w"):
            tensor.CopyFrom(
                onnx.numpy_helper.from_array(
                    np.zeros_like(onnx.numpy_helper.to_array(tensor)), tensor.name
                )
            )
    build_artifact(
        model,
        "x86",
        tmp_path / "ties",
        manifest_fields={},
        progress=False,
        report=lambda _message: None,
        prepost=PrepostRequest(False, True, spec),
    )
    session = ort_session(model, threads=1)
    artifact = load_artifact(tmp_path / "ties")
    images = _images(seed=7)[:1]
    comparison = compare_on_images(
        {"preprocess": False, "nms": True},
        spec,
        lambda feeds: run_session(session, feeds),
        artifact.run,
        images,
    )
    assert comparison.images[0].identical_lists
    assert comparison.images[0].candidate_count >= 1


def _can_emulate_arm() -> bool:
    from detc.compiler.errors import ToolchainMissingError
    from detc.targets.remote import toolchain

    try:
        toolchain.find_aarch64_cross_compiler(require_cxx=True)
    except ToolchainMissingError:
        return False
    return toolchain.find_qemu_aarch64() is not None


@pytest.mark.slow  # the first emulated run prepares the aarch64 environment in the cache
@pytest.mark.skipif(not _can_emulate_arm(), reason="no aarch64 cross compiler or qemu-aarch64")
def test_arm_artifact_verifies_under_emulation(tmp_path: Path) -> None:
    from detc.compiler.verify.artifact import verify_artifact

    model = _tiny_detector("yolox", seed=2)
    spec = _spec("yolox")
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    build_artifact(
        model,
        "arm",
        tmp_path / "arm",
        manifest_fields={"model_spec": spec.to_dict()},
        progress=False,
        report=lambda _message: None,
        prepost=PrepostRequest(True, True, spec),
        extra_files={"reference.onnx": model.SerializeToString()},
    )
    report = verify_artifact(tmp_path / "arm", reference=tmp_path / "model.onnx", emulate=True)
    assert report.ok, report.lines()
