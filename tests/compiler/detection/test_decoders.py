from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from detc.compiler.detection.decoders import (
    Detections,
    decode,
    decoder_names,
    get_decoder,
    postprocess,
    register_decoder,
    yolox_grid,
)
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError

SPEC = ModelSpec(class_names=("cat", "dog"), input_size=(64, 64))


def _yolov5_rows() -> np.ndarray:
    """Three predictions in YOLOv5 layout: cx, cy, w, h, objectness, p(cat), p(dog)."""
    return np.array(
        [
            [50, 50, 20, 10, 0.9, 0.8, 0.1],  # cat 0.72 at [40, 45, 60, 55]
            [51, 50, 20, 10, 0.8, 0.7, 0.2],  # cat 0.56, IoU ~0.9 with row 0: suppressed
            [10, 10, 4, 4, 0.5, 0.2, 0.6],  # dog 0.30 at [8, 8, 12, 12]
            [30, 30, 8, 8, 0.0005, 1.0, 0.0],  # objectness under the floor
        ],
        dtype=np.float32,
    )[np.newaxis]


def test_yolov5_scores_boxes_and_nms() -> None:
    dets = decode("yolov5", {"output0": _yolov5_rows()}, SPEC)
    np.testing.assert_allclose(dets.scores, [0.72, 0.30], rtol=1e-6)
    assert dets.class_ids.tolist() == [0, 1]
    np.testing.assert_allclose(dets.boxes, [[40, 45, 60, 55], [8, 8, 12, 12]])
    assert dets.boxes.dtype == np.float32


def test_yolov5_keeps_the_best_class_per_box_and_multi_label_keeps_all() -> None:
    rows = _yolov5_rows()[0]
    boxes = np.array([[40, 45, 60, 55]], np.float32)
    single = postprocess(boxes, rows[:1, 5:] * rows[:1, 4:5], SPEC)
    multi = postprocess(boxes, rows[:1, 5:] * rows[:1, 4:5], SPEC, multi_label=True)
    assert single.class_ids.tolist() == [0]
    assert multi.class_ids.tolist() == [0, 1]  # the same box as a dog at 0.09: other class
    np.testing.assert_allclose(multi.scores, [0.72, 0.09], rtol=1e-6)


def test_thresholds_and_max_detections_come_from_the_spec() -> None:
    outputs = {"output0": _yolov5_rows()}
    assert len(decode("yolov5", outputs, SPEC.with_overrides(score_threshold=0.5))) == 1
    assert len(decode("yolov5", outputs, SPEC.with_overrides(max_detections=1))) == 1
    # with NMS at IoU 0.95 the second cat survives
    assert len(decode("yolov5", outputs, SPEC.with_overrides(iou_threshold=0.95))) == 3


def test_demo_decoder_is_the_yolov5_layout() -> None:
    outputs = {"output0": _yolov5_rows()}
    a, b = decode("demo", outputs, SPEC), decode("yolov5", outputs, SPEC)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_output_is_chosen_by_name_else_the_first() -> None:
    decoy = np.zeros((1, 4, 7), np.float32)
    outputs = {"aux": decoy, "output0": _yolov5_rows()}
    assert len(decode("yolov5", outputs, SPEC)) == 0  # first output: the empty decoy
    assert len(decode("yolov5", outputs, SPEC.with_overrides(output_name="output0"))) == 2
    with pytest.raises(BadInputError, match="'missing'"):
        decode("yolov5", outputs, SPEC.with_overrides(output_name="missing"))


def test_class_count_mismatch_is_reported() -> None:
    spec = SPEC.with_overrides(class_names="a,b,c")
    with pytest.raises(BadInputError, match="3 classes"):
        decode("yolov5", {"output0": _yolov5_rows()}, spec)


def test_bad_output_shape_is_reported() -> None:
    with pytest.raises(BadInputError, match="shape"):
        decode("yolov5", {"output0": np.zeros((1, 2, 3, 4), np.float32)}, SPEC)


def test_non_finite_boxes_are_dropped() -> None:
    rows = _yolov5_rows().copy()
    rows[0, 0, 0] = np.nan
    rows[0, 1, 0] = np.inf
    dets = decode("yolov5", {"output0": rows}, SPEC)
    assert dets.class_ids.tolist() == [1]


def test_yolov8_channels_first_and_transposed() -> None:
    # cx, cy, w, h, p(cat), p(dog) for three boxes; no objectness
    rows = np.array(
        [[50, 50, 20, 10, 0.72, 0.1], [10, 10, 4, 4, 0.2, 0.3], [30, 30, 8, 8, 0.0, 0.0005]],
        dtype=np.float32,
    )
    # pad to more boxes than channels, as real heads have (N >> 4 + C)
    rows = np.concatenate([rows, np.zeros((7, 6), np.float32)])
    dets = decode("yolov8", {"output0": rows.T[np.newaxis]}, SPEC)
    np.testing.assert_allclose(dets.scores, [0.72, 0.3], rtol=1e-6)
    assert dets.class_ids.tolist() == [0, 1]
    np.testing.assert_allclose(dets.boxes, [[40, 45, 60, 55], [8, 8, 12, 12]])
    transposed = decode("yolov8", {"output0": rows[np.newaxis]}, SPEC)
    np.testing.assert_array_equal(transposed.boxes, dets.boxes)


def test_yolox_grid_order() -> None:
    grid, strides = yolox_grid((64, 64))
    assert grid.shape == (8 * 8 + 4 * 4 + 2 * 2, 2)
    assert grid[1].tolist() == [1, 0]  # x runs fastest
    assert grid[8].tolist() == [0, 1]
    assert grid[64].tolist() == [0, 0] and strides[64, 0] == 16
    assert strides[-1, 0] == 32


def _yolox_output(obj: float, cls: tuple[float, float]) -> np.ndarray:
    rows = np.zeros((84, 7), np.float32)
    # stride-16 level starts at row 64; cell x=2, y=1 → row 64 + 1 * 4 + 2
    rows[70] = [0.5, 0.25, math.log(2.0), 0.0, obj, *cls]
    return rows[np.newaxis]


def test_yolox_adds_grid_and_scales_by_stride() -> None:
    dets = decode("yolox", {"output": _yolox_output(0.8, (0.25, 0.5))}, SPEC)
    # centre ((0.5 + 2) * 16, (0.25 + 1) * 16) = (40, 20); size (2 * 16, 1 * 16)
    np.testing.assert_allclose(dets.boxes, [[24, 12, 56, 28]], rtol=1e-6)
    np.testing.assert_allclose(dets.scores, [0.4], rtol=1e-6)
    assert dets.class_ids.tolist() == [1]


def test_yolox_logits_applies_the_sigmoid() -> None:
    outputs = {"output": _yolox_output(2.0, (-1.0, 0.0))}
    spec = SPEC.with_overrides(score_threshold=0.3)  # zero logits elsewhere score 0.25
    dets = decode("yolox-logits", outputs, spec)
    expected = 1 / (1 + math.exp(-2.0)) * 0.5
    assert len(dets) == 1
    np.testing.assert_allclose(dets.scores, [expected], rtol=1e-6)


def test_yolox_rejects_a_grid_that_does_not_fit_the_input() -> None:
    with pytest.raises(BadInputError, match="84 cells"):
        decode("yolox", {"output": np.zeros((1, 80, 7), np.float32)}, SPEC)


def test_custom_decoder_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "detc_test_custom_decoder.py"
    module.write_text(
        "import numpy as np\n"
        "from detc.compiler.detection.decoders import Detections\n"
        "def decode(outputs, spec):\n"
        "    boxes = np.asarray(outputs['boxes'], dtype=np.float32)\n"
        "    keep = boxes[:, 4] >= spec.score_threshold\n"
        "    return Detections(boxes[keep, :4], boxes[keep, 4], np.zeros(int(keep.sum())))\n"
        "class Holder:\n"
        "    @staticmethod\n"
        "    def wrong(outputs, spec):\n"
        "        return [1, 2]\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "detc_test_custom_decoder", raising=False)
    outputs = {"boxes": np.array([[1, 2, 3, 4, 0.9], [5, 6, 7, 8, 0.1]], np.float32)}
    spec = SPEC.with_overrides(score_threshold=0.5)
    dets = decode("detc_test_custom_decoder:decode", outputs, spec)
    np.testing.assert_array_equal(dets.boxes, [[1, 2, 3, 4]])
    assert get_decoder("detc_test_custom_decoder:decode").__name__ == "decode"
    with pytest.raises(BadInputError, match="returned list"):
        decode("detc_test_custom_decoder:Holder.wrong", outputs, spec)
    with pytest.raises(BadInputError, match="not callable"):
        get_decoder("detc_test_custom_decoder:NOT_CALLABLE")
    with pytest.raises(BadInputError, match="has no"):
        get_decoder("detc_test_custom_decoder:nothing")
    with pytest.raises(BadInputError, match="cannot import"):
        get_decoder("detc_no_such_module_xyz:decode")


def test_unknown_decoder_lists_the_known_ones() -> None:
    with pytest.raises(BadInputError, match="yolov5"):
        get_decoder("retinanet")


def test_register_decoder() -> None:
    def constant(outputs: object, spec: ModelSpec) -> Detections:
        return Detections.empty()

    register_decoder("detc-test-constant", constant)
    try:
        assert "detc-test-constant" in decoder_names()
        assert len(decode("detc-test-constant", {}, SPEC)) == 0
    finally:
        from detc.compiler.detection import decoders

        decoders._REGISTRY.pop("detc-test-constant")


def test_detections_validate_lengths() -> None:
    with pytest.raises(ValueError):
        Detections(np.zeros((2, 4)), np.zeros(2), np.zeros(3))
    dets = Detections(np.ones((1, 4)), [0.5], [2.0])
    assert dets.class_ids.dtype == np.int64 and dets.boxes.dtype == np.float32
