"""Verifying artifacts with compiled pre/post-processing: the comparison itself, the demo
detector end to end, and yolov5n on coco64 (issue #20, acceptance 3; slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detc.compiler.detection.decoders import Detections
from detc.compiler.driver import compile_model
from detc.compiler.verify.artifact import verify_artifact
from detc.compiler.verify.prepost import BOX_TOLERANCE_PX, STRICT_SCORE, compare_detections


def _detections(boxes: list[list[float]], scores: list[float], classes: list[int]) -> Detections:
    return Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(classes))


def test_comparison_names_a_class_flip_and_a_moved_box() -> None:
    reference = _detections([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.5], [1, 2])
    same = compare_detections("same", reference, reference)
    assert same.ok and same.identical_lists and same.max_box_diff == 0.0
    flipped = compare_detections(
        "flip", reference, _detections([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.5], [1, 0])
    )
    assert not flipped.ok and "DIFFER" in flipped.describe()
    moved = compare_detections(
        "moved",
        reference,
        _detections([[0, 0, 10, 10], [20, 20, 30 + 2 * BOX_TOLERANCE_PX, 30]], [0.9, 0.5], [1, 2]),
    )
    assert not moved.ok and moved.strict_max_box_diff == pytest.approx(2 * BOX_TOLERANCE_PX)
    # below the strict score a swap is reported, not failed
    low = _detections([[0, 0, 10, 10], [1, 1, 5, 5], [2, 2, 6, 6]], [0.9, 0.1, 0.1], [1, 0, 2])
    swapped = _detections([[0, 0, 10, 10], [2, 2, 6, 6], [1, 1, 5, 5]], [0.9, 0.1, 0.1], [1, 2, 0])
    assert STRICT_SCORE > 0.1
    result = compare_detections("swap", low, swapped)
    assert result.ok and not result.identical_lists


@pytest.mark.slow  # the demo detector compiles in ~40 s here
def test_demo_detector_with_both_flags_verifies(tmp_path: Path) -> None:
    from detc.compiler.demo.run import demo_asset_paths
    from detc.compiler.detection.spec import load_spec

    model, spec_path = demo_asset_paths()
    compile_model(
        model,
        target="x86",
        out_dir=tmp_path / "demo",
        model_spec=load_spec(spec_path),
        progress=False,
        with_preprocess=True,
        with_nms=True,
    )
    report = verify_artifact(tmp_path / "demo")
    assert report.ok, report.lines()
    text = "\n".join(report.lines())
    assert "compiled preprocess + nms" in text and "raw output tensors are not compared" in text


@pytest.mark.slow
def test_yolov5n_map_on_coco64_equals_the_python_path(
    tmp_path: Path, yolov5n_path: Path, coco64_dir: Path
) -> None:
    compile_model(
        yolov5n_path,
        target="x86",
        out_dir=tmp_path / "y5",
        progress=False,
        with_preprocess=True,
        with_nms=True,
    )
    report = verify_artifact(tmp_path / "y5", data=coco64_dir)
    assert report.ok, report.lines()
    detection = report.detection
    assert detection is not None and detection.candidate is not None
    assert detection.candidate.metrics.map == pytest.approx(
        detection.reference.metrics.map, abs=1e-3
    )
    assert not report.prepost_dataset.mismatches
