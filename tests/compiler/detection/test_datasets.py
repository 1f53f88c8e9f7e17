from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from detc.compiler.detection.datasets import (
    CocoDataset,
    ImageFolder,
    letterbox_geometry,
    preprocess,
)
from detc.compiler.detection.spec import ModelSpec, load_spec, spec_from_onnx, write_spec
from detc.compiler.errors import BadInputError

SPEC = ModelSpec(input_size=(64, 64))


def _solid(width: int, height: int, rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), rgb)


# --- preprocessing geometry -------------------------------------------------------------------


def test_letterbox_geometry_wide_image() -> None:
    # 100x50 into 64x64: ratio min(64/50, 64/100) = 0.64 → 64x32, 16 rows of border each side
    transform = letterbox_geometry((50, 100), (64, 64), SPEC)
    assert transform.pad == (16, 0)
    assert transform.gain == (32 / 50, 64 / 100)


def test_letterbox_odd_border_puts_the_smaller_half_on_top() -> None:
    # 100x48 → 64x31 (48 * 0.64 = 30.72); border 33 = 16 on top + 17 below, as YOLOv5 does
    tensor, transform = preprocess(_solid(100, 48, (200, 100, 50)), SPEC)
    assert transform.pad == (16, 0)
    red = tensor[0, 0]
    assert np.allclose(red[:16], 114 / 255) and np.allclose(red[47:], 114 / 255)
    np.testing.assert_allclose(red[16:47], 200 / 255, rtol=1e-6)


def test_preprocess_pixels_channels_and_dtype() -> None:
    tensor, _ = preprocess(_solid(64, 64, (255, 0, 10)), SPEC)
    assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0, :, 5, 5], [1.0, 0.0, 10 / 255], rtol=1e-6)
    bgr = SPEC.with_overrides(channel_order="BGR", layout="NHWC", dtype="float16")
    tensor, _ = preprocess(_solid(64, 64, (255, 0, 10)), bgr)
    assert tensor.shape == (1, 64, 64, 3) and tensor.dtype == np.float16
    np.testing.assert_allclose(tensor[0, 5, 5].astype(np.float32), [10 / 255, 0.0, 1.0], rtol=1e-3)


def test_preprocess_mean_std_after_scale() -> None:
    spec = SPEC.with_overrides(mean=(0.5, 0.5, 0.5), std="0.25, 0.5, 1")
    tensor, _ = preprocess(_solid(64, 64, (255, 255, 0)), spec)
    np.testing.assert_allclose(tensor[0, :, 0, 0], [2.0, 1.0, -0.5], rtol=1e-6)


def test_top_left_padding_for_yolox() -> None:
    spec = SPEC.with_overrides(pad_align="top-left", pad_value=0, scale=1.0)
    tensor, transform = preprocess(_solid(100, 50, (7, 7, 7)), spec)
    assert transform.pad == (0, 0)
    assert np.all(tensor[0, 0, :32] == 7) and np.all(tensor[0, 0, 32:] == 0)


def test_plain_resize_stretches_without_border() -> None:
    spec = SPEC.with_overrides(resize="resize")
    tensor, transform = preprocess(_solid(100, 50, (9, 9, 9)), spec)
    assert transform.pad == (0, 0) and transform.gain == (64 / 50, 64 / 100)
    np.testing.assert_allclose(tensor, 9 / 255, rtol=1e-6)


@pytest.mark.parametrize("resize", ["letterbox", "resize"])
def test_boxes_map_back_to_the_painted_rectangle(resize: str) -> None:
    """Paint a rectangle, find it in the model input, map its edges back: the same pixels."""
    image = np.zeros((120, 200, 3), np.uint8)
    x1, y1, x2, y2 = 40, 30, 140, 90  # pixel edges
    image[y1:y2, x1:x2] = 255
    spec = ModelSpec(input_size=(100, 100), resize=resize, pad_value=0)
    tensor, transform = preprocess(Image.fromarray(image), spec)
    bright = tensor[0, 0] > 0.5
    rows, cols = np.nonzero(bright)
    found = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], np.float32)
    back = transform.boxes_to_original(found)
    # one model-input pixel of bilinear blur is 2 original pixels here
    np.testing.assert_allclose(back[0], [x1, y1, x2, y2], atol=2.5)


def test_boxes_round_trip_and_clip() -> None:
    transform = letterbox_geometry((480, 640), (640, 640), SPEC)
    boxes = np.array([[10, 20, 300, 400], [0, 0, 640, 480]], np.float32)
    np.testing.assert_allclose(
        transform.boxes_to_original(transform.boxes_to_input(boxes)), boxes, atol=1e-4
    )
    # a box reaching into the border is clipped to the image
    outside = transform.boxes_to_original(np.array([[-5, 0, 700, 640]], np.float32))
    np.testing.assert_allclose(outside, [[0, 0, 640, 480]])


# --- model spec -------------------------------------------------------------------------------


def test_spec_round_trips_through_dict_json_and_toml(tmp_path: Path) -> None:
    spec = ModelSpec(
        input_size=(480, 640),
        channel_order="BGR",
        mean=(0.1, 0.2, 0.3),
        class_names=("cat", "dog"),
        category_ids=(17, 18),
        output_name="dets",
        decoder="yolox",
        # what the TOML below leaves out comes from the YOLOX family's preprocessing
        pad_align="top-left",
        scale=1.0,
    )
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert load_spec(write_spec(spec, tmp_path / "spec.json")) == spec
    toml = tmp_path / "spec.toml"
    toml.write_text(
        'input_size = [480, 640]\nchannel_order = "BGR"\nmean = [0.1, 0.2, 0.3]\n'
        'class_names = ["cat", "dog"]\ncategory_ids = [17, 18]\noutput_name = "dets"\n'
        'decoder = "yolox"\n'
    )
    assert load_spec(toml) == spec


def test_spec_unknown_keys(tmp_path: Path) -> None:
    assert ModelSpec.from_dict({"synth": {"seed": 1}, "trained": True}) == ModelSpec()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"input_sise": 320}))
    with pytest.raises(BadInputError, match=r"spec\.json.*'input_sise'"):
        load_spec(path)


def test_spec_rejects_bad_values_and_files(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="layout"):
        ModelSpec.from_dict({"layout": "NCWH"})
    with pytest.raises(BadInputError, match="std"):
        ModelSpec(std=(1.0, 0.0, 1.0))
    with pytest.raises(BadInputError, match="input_size"):
        ModelSpec.from_dict({"input_size": "big"})
    with pytest.raises(BadInputError, match="category_ids"):
        ModelSpec(class_names=("a", "b"), category_ids=(1,))
    garbled = tmp_path / "spec.json"
    garbled.write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        load_spec(garbled)
    with pytest.raises(BadInputError, match="does not exist"):
        load_spec(tmp_path / "absent.toml")


def test_spec_overrides_take_cli_strings() -> None:
    spec = ModelSpec().with_overrides(
        input_size="480x640", scale="1/127.5", class_names="a, b", dtype="fp16", decoder=None
    )
    assert spec.input_size == (480, 640)
    assert spec.scale == pytest.approx(1 / 127.5)
    assert spec.class_names == ("a", "b") and spec.dtype == "float16"
    assert spec.decoder == "yolov5"  # None means "flag not given"
    assert ModelSpec().with_overrides(input_size=320).input_size == (320, 320)
    with pytest.raises(BadInputError, match="unknown key"):
        ModelSpec().with_overrides(colour="red")


def _tiny_onnx(names: str | None, elem_type: int = TensorProto.FLOAT, nhwc: bool = False):
    shape = [1, 32, 48, 3] if nhwc else [1, 3, 32, 48]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["out"])],
        "tiny",
        [helper.make_tensor_value_info("pixels", elem_type, shape)],
        [helper.make_tensor_value_info("out", elem_type, shape)],
    )
    model = helper.make_model(graph)
    if names is not None:
        helper.set_model_props(model, {"names": names, "stride": "32"})
    onnx.checker.check_model(model)
    return model


def test_spec_from_onnx_reads_input_and_names() -> None:
    spec = spec_from_onnx(_tiny_onnx("{0: 'person', 1: 'bicycle'}"))
    assert spec.input_name == "pixels"
    assert spec.input_size == (32, 48)
    assert spec.layout == "NCHW" and spec.dtype == "float32"
    assert spec.class_names == ("person", "bicycle")
    # YOLOv5 preprocessing by default
    assert (spec.resize, spec.pad_value, spec.channel_order) == ("letterbox", 114.0, "RGB")
    assert spec.scale == pytest.approx(1 / 255)
    half = spec_from_onnx(_tiny_onnx(None, TensorProto.FLOAT16, nhwc=True), decoder="yolox")
    assert (half.dtype, half.layout, half.input_size) == ("float16", "NHWC", (32, 48))
    assert half.class_names == () and half.decoder == "yolox"


def test_spec_from_onnx_never_executes_metadata() -> None:
    with pytest.raises(BadInputError, match="names"):
        spec_from_onnx(_tiny_onnx("__import__('os').system('echo pwned')"))
    with pytest.raises(BadInputError, match="names"):
        spec_from_onnx(_tiny_onnx("{0: 'a', 2: 'c'}"))


def _head_model(input_shape: list[int], output_shape: list[int]) -> onnx.ModelProto:
    constant = helper.make_tensor(
        "zeros", TensorProto.FLOAT, output_shape, [0.0] * int(np.prod(output_shape))
    )
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=constant)],
        "head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
    )
    model = helper.make_model(graph)
    helper.set_model_props(model, {"names": "{0: 'a', 1: 'b'}"})
    return model


def test_spec_from_onnx_guesses_the_decoder_from_the_output_layout() -> None:
    assert spec_from_onnx(_head_model([1, 3, 32, 32], [1, 6, 100])).decoder == "yolov8"
    assert spec_from_onnx(_head_model([1, 3, 32, 32], [1, 100, 7])).decoder == "yolov5"


def test_spec_from_onnx_rejects_a_non_image_input() -> None:
    with pytest.raises(BadInputError, match="rank 3"):
        spec_from_onnx(_head_model([1, 6, 100], [1, 6, 100]))


# --- datasets ---------------------------------------------------------------------------------


def _write_coco(root: Path, sizes: list[tuple[int, int]]) -> None:
    (root / "images").mkdir(parents=True)
    images = []
    for index, (width, height) in enumerate(sizes):
        name = f"{index:03d}.png"
        _solid(width, height, (index * 40, 0, 0)).save(root / "images" / name)
        images.append({"id": 100 + index, "file_name": name, "width": width, "height": height})
    data = {
        "images": images,
        "annotations": [
            {
                "id": 1,
                "image_id": 100,
                "category_id": 3,
                "bbox": [1, 1, 5, 5],
                "area": 25,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}],
    }
    (root / "instances.json").write_text(json.dumps(data))


def test_coco_dataset_iterates_preprocessed_samples(tmp_path: Path) -> None:
    _write_coco(tmp_path, [(40, 20), (30, 30)])
    dataset = CocoDataset(tmp_path, spec=SPEC)
    assert len(dataset) == 2 and dataset.image_ids == [100, 101]
    assert dataset.category_ids == (1, 3) and dataset.category_names == ("person", "car")
    samples = list(dataset)
    image_id, path, size, tensor, transform = samples[1]
    assert (image_id, path.name, size) == (101, "001.png", (30, 30))
    assert tensor.shape == (1, 3, 64, 64) and transform.original_size == (30, 30)
    np.testing.assert_allclose(tensor[0, 0, 32, 32], 40 / 255, rtol=1e-6)
    assert len(list(dataset.samples(SPEC, max_images=1))) == 1


def test_coco_dataset_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"instances\.json"):
        CocoDataset(tmp_path)
    _write_coco(tmp_path / "a", [(8, 8)])
    (tmp_path / "a" / "instances.json").write_text('{"images": [')
    with pytest.raises(BadInputError, match=r"instances\.json are not valid JSON"):
        CocoDataset(tmp_path / "a")
    _write_coco(tmp_path / "b", [(8, 8), (8, 8)])
    (tmp_path / "b" / "images" / "001.png").unlink()
    with pytest.raises(BadInputError, match=r"missing, first .*001\.png"):
        CocoDataset(tmp_path / "b")
    _write_coco(tmp_path / "c", [(8, 8)])
    (tmp_path / "c" / "images" / "000.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadInputError, match=r"000\.png cannot be decoded"):
        list(CocoDataset(tmp_path / "c").samples(SPEC))
    _write_coco(tmp_path / "d", [(8, 8)])
    (tmp_path / "d" / "instances.json").write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(BadInputError, match="'annotations'"):
        CocoDataset(tmp_path / "d")


def test_image_folder(tmp_path: Path) -> None:
    _write_coco(tmp_path, [(16, 8), (8, 16), (8, 8)])
    folder = ImageFolder(tmp_path)  # falls back to images/
    assert len(folder) == 3 and folder.paths[0].name == "000.png"
    first = next(iter(folder.samples(SPEC)))
    assert first.image_id == 0 and first.original_size == (8, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="holds no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(BadInputError, match="model spec is needed"):
        next(iter(folder))
