"""Decoder names are family presets: each brings its preprocessing (issue: real detectors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

from detc.compiler.detection.datasets import preprocess
from detc.compiler.detection.spec import ModelSpec, load_spec, spec_for_model


def _yolox_reference(image_rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """YOLOX's documented ``preproc``: BGR (OpenCV's order), gray-114 canvas, image resized by
    r = min(H/h, W/w) and placed at the top-left, no normalisation, CHW float32."""
    bgr = image_rgb[:, :, ::-1]
    h, w = bgr.shape[:2]
    r = min(size[0] / h, size[1] / w)
    new_w, new_h = int(w * r), int(h * r)
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(bgr)).resize((new_w, new_h), Image.Resampling.BILINEAR)
    )
    canvas = np.full((size[0], size[1], 3), 114, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)


def test_yolox_preset_follows_the_family_recipe(rng: np.random.Generator):
    image = rng.integers(0, 256, size=(160, 320, 3), dtype=np.uint8)  # r = 2 exactly
    spec = ModelSpec(input_size=(640, 640)).with_overrides(decoder="yolox")
    assert (spec.channel_order, spec.scale, spec.pad_align, spec.pad_value) == (
        "BGR",
        1.0,
        "top-left",
        114.0,
    )
    tensor, _ = preprocess(Image.fromarray(image), spec)
    np.testing.assert_allclose(tensor[0], _yolox_reference(image, (640, 640)), atol=1.0)
    # the canvas below the image is the pad value, not YOLOv5's centred letterbox
    assert np.all(tensor[0, :, 330:, :] == 114.0)


def test_flags_beside_the_decoder_still_win():
    spec = ModelSpec().with_overrides(decoder="yolox", channel_order="RGB")
    assert spec.channel_order == "RGB" and spec.scale == 1.0


def test_a_spec_file_naming_only_the_decoder_gets_the_family_preprocessing(tmp_path: Path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"decoder": "yolox"}))
    spec = load_spec(path)
    assert (spec.channel_order, spec.scale, spec.pad_align) == ("BGR", 1.0, "top-left")


def _model_416(tmp_path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["out"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 416, 416])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 416, 416])],
    )
    path = tmp_path / "m416.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_fields_a_spec_file_leaves_out_come_from_the_model(tmp_path: Path):
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('decoder = "yolox"\nscore_threshold = 0.25\n')
    spec = spec_for_model(_model_416(tmp_path), spec_path)
    assert spec.input_size == (416, 416)  # the model's, not the 640 default
    assert spec.decoder == "yolox" and spec.channel_order == "BGR"
    assert spec.score_threshold == 0.25
