from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detc.compiler.detection.datasets import CocoDataset
from detc.compiler.detection.report import DetectionReport, evaluate_detection
from detc.compiler.detection.spec import ModelSpec, spec_from_onnx

# Images are 64x48; the model input is 32x32: letterbox gain 0.5, 4 rows of border on top,
# so an original box (x1, y1, x2, y2) sits at (x1 / 2, y1 / 2 + 4, x2 / 2, y2 / 2 + 4).
SPEC = ModelSpec(input_size=(32, 32), class_names=("person", "car"))
PERSON, CAR = 0, 1
#: red level that identifies each image → (image id, [(class, original x1, y1, x2, y2)])
IMAGES = {
    60: (1, [(PERSON, 8, 8, 24, 24), (CAR, 32, 16, 56, 40)]),
    120: (2, [(PERSON, 40, 0, 60, 30)]),
    180: (3, [(CAR, 0, 20, 30, 40)]),
}


Row = tuple[int, float, float, float, float, float]  # class, objectness, x1, y1, x2, y2


@pytest.fixture
def dataset(tmp_path: Path) -> CocoDataset:
    root = tmp_path / "tiny_coco"
    (root / "images").mkdir(parents=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for red, (image_id, objects) in IMAGES.items():
        Image.new("RGB", (64, 48), (red, 0, 0)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 48})
        for cls, x1, y1, x2, y2 in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "instances.json").write_text(json.dumps(data))
    return CocoDataset(root)


def _rows(objects: list[Row]) -> np.ndarray:
    """YOLOv5 output (1, 8, 7) from (class, objectness, x1, y1, x2, y2) in input pixels."""
    out = np.zeros((1, 8, 7), np.float32)
    for row, (cls, obj, x1, y1, x2, y2) in enumerate(objects):
        out[0, row, :5] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, obj]
        out[0, row, 5 + cls] = 1.0
    return out


def _in_input(cls: int, obj: float, x1: float, y1: float, x2: float, y2: float) -> Row:
    """A row for an object given in original pixels, placed in model-input pixels."""
    return (cls, obj, x1 / 2, y1 / 2 + 4, x2 / 2, y2 / 2 + 4)


def _image_of(feeds: Mapping[str, np.ndarray]) -> int:
    tensor = feeds["images"]
    assert tensor.shape == (1, 3, 32, 32) and tensor.dtype == np.float32
    return round(float(tensor[0, 0, 16, 16]) * 255)


def reference_runner(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    _, objects = IMAGES[_image_of(feeds)]
    return {"output0": _rows([_in_input(c, 0.9, x1, y1, x2, y2) for c, x1, y1, x2, y2 in objects])}


def perturbed_runner(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    red = _image_of(feeds)
    objects: list[Row]
    if red == 60:  # same boxes, objectness 0.85: score drift 0.05 on both
        objects = [_in_input(c, 0.85, x1, y1, x2, y2) for c, x1, y1, x2, y2 in IMAGES[60][1]]
    elif red == 120:  # the person is lost; a car appears where there is none
        objects = [(CAR, 0.9, 2.0, 22.0, 8.0, 27.0)]
    else:  # the car is called a person
        _, x1, y1, x2, y2 = IMAGES[180][1][0]
        objects = [_in_input(PERSON, 0.9, x1, y1, x2, y2)]
    return {"output0": _rows(objects)}


def test_perturbed_candidate_is_counted_box_by_box(dataset: CocoDataset) -> None:
    report = evaluate_detection(
        reference_runner, perturbed_runner, dataset, SPEC, "yolov5", progress=False
    )
    assert report.num_images == 3
    assert report.reference.metrics.map == pytest.approx(1.0)
    # candidate, per class: a false positive at 0.9 ranked above the one true positive at 0.85,
    # recall 1/2 → interpolated precision 1/2 on 51 of 101 recall points, every IoU threshold
    assert report.candidate is not None
    assert report.candidate.metrics.map == pytest.approx(0.5 * 51 / 101)
    assert report.map_drop == pytest.approx(100 * (1 - 0.5 * 51 / 101))

    agreement = report.agreement
    assert agreement is not None
    assert (agreement.reference_boxes, agreement.candidate_boxes) == (4, 4)
    assert (agreement.matched, agreement.lost, agreement.extra, agreement.class_flips) == (
        2,
        1,
        1,
        1,
    )
    assert agreement.images_identical == 1
    assert agreement.max_score_drift == pytest.approx(0.05, abs=1e-6)
    assert agreement.min_iou == pytest.approx(1.0)
    per_image = {a.image_id: (a.lost, a.extra, a.class_flips) for a in report.per_image}
    assert per_image == {1: (0, 0, 0), 2: (1, 1, 0), 3: (0, 0, 1)}

    (diff,) = report.tensor_diffs
    assert diff.name == "output0" and not diff.within_tolerance
    # worst element: the lost person's centre x (25 in the reference, 5 for the new car)
    assert diff.max_abs_error == pytest.approx(25.0 - 5.0)
    assert report.outputs_within_tolerance is False


def test_identical_candidate(dataset: CocoDataset) -> None:
    report = evaluate_detection(reference_runner, reference_runner, dataset, SPEC, progress=False)
    assert report.map_drop == pytest.approx(0.0)
    assert report.outputs_within_tolerance is True
    assert report.agreement is not None and report.agreement.agreement == 1.0


def test_the_report_states_no_latency(dataset: CocoDataset, tmp_path: Path) -> None:
    """It timed Python-side runner calls, first runs included: detc 4x slower than onnxruntime
    for a build detc bench puts at parity. Latency is bench's to measure."""
    report = evaluate_detection(reference_runner, reference_runner, dataset, SPEC, progress=False)
    assert "ms / image" not in report.render_table()
    report.write(tmp_path / "report")
    assert "ms / image" not in (tmp_path / "report" / "report.md").read_text()
    assert "mean_ms_per_image" not in (tmp_path / "report" / "report.json").read_text()


def test_progress_bar_stays_out_of_logs(
    dataset: CocoDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    """progress=True draws a bar on a terminal only: in a CI log every redraw would be a line."""
    evaluate_detection(reference_runner, reference_runner, dataset, SPEC, progress=True)
    assert "detection check" not in capsys.readouterr().err  # captured stderr is not a terminal


def test_reference_only_and_max_images(dataset: CocoDataset, tmp_path: Path) -> None:
    report = evaluate_detection(reference_runner, None, dataset, SPEC, max_images=2, progress=False)
    assert report.num_images == 2 and report.candidate is None
    assert report.map_drop is None and report.outputs_within_tolerance is None
    assert report.reference.metrics.num_images == 2
    written = report.write(tmp_path / "ref_only")
    assert sorted(p.name for p in written) == ["report.json", "report.md"]
    assert "mAP@[.5:.95]" in report.render_table()


def test_report_files(dataset: CocoDataset, tmp_path: Path) -> None:
    report = evaluate_detection(
        reference_runner,
        perturbed_runner,
        dataset,
        SPEC,
        progress=False,
        reference_label="onnxruntime",
        candidate_label="tvm",
    )
    out = tmp_path / "report"
    written = report.write(out)
    assert {p.name for p in written} == {
        "report.json",
        "report.md",
        "box_agreement.png",
        "score_drift.png",
    }
    data = json.loads((out / "report.json").read_text())
    assert data["num_images"] == 3
    assert data["map_drop_points"] == pytest.approx(report.map_drop)
    assert data["agreement"]["lost"] == 1 and data["agreement"]["class_flips"] == 1
    assert data["candidate"]["label"] == "tvm"
    assert data["spec"]["input_size"] == [32, 32]
    markdown = (out / "report.md").read_text()
    assert "](box_agreement.png)" in markdown and "](score_drift.png)" in markdown
    for png in ("box_agreement.png", "score_drift.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.render_table()
    assert "onnxruntime" in table and "tvm" in table
    assert report.map_drop is not None and f"{-report.map_drop:+.2f}" in table
    assert "lost 1, extra 1, class flips 1" in table
    assert isinstance(report, DetectionReport)


@pytest.mark.shared
@pytest.mark.slow
def test_yolov5n_on_coco64_matches_the_reference_figures(
    yolov5n_path: Path, coco64_dir: Path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(yolov5n_path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, dict(feeds)), strict=True))

    spec = spec_from_onnx(str(yolov5n_path))
    report = evaluate_detection(run, None, CocoDataset(coco64_dir), spec, progress=False)
    # ../shared/data/README.md: mAP@[.5:.95] = 0.360, mAP@.5 = 0.566 (three decimals)
    assert report.reference.metrics.map == pytest.approx(0.360, abs=0.0015)
    assert report.reference.metrics.map50 == pytest.approx(0.566, abs=0.0015)
