"""recover's labeled fine-tuning: rows assigned to boxes as YOLOv5 assigns them, a loss that
falls as predictions meet the boxes, the geometry read off a real YOLOv5 decode, and labels= used
by the end-to-end step (refused for models YOLOv5's loss does not fit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import pytest
from PIL import Image

from detc.compiler.errors import BadInputError
from detc.passes.recover.labeled import RowGeometry, assign, detection_loss
from tests.passes.recover._tiny import damaged, run_recover, tiny_decoded_detector

if TYPE_CHECKING:  # the annotations' torch; at run time, importorskip's
    import torch

torch = pytest.importorskip("torch")


def _geometry() -> RowGeometry:
    """Two levels: stride 8 cells centred at 4 and 12 (anchor 10x10), stride 16 at 8 (40x40)."""
    centres = np.array([[4, 4], [12, 4], [4, 12], [12, 12], [8, 8]], np.float64)
    anchors = np.array([[10, 10]] * 4 + [[40, 40]], np.float64)
    return RowGeometry(centres, anchors, np.array([8, 8, 8, 8, 16.0]), np.array([0, 0, 0, 0, 1]))


def test_a_box_is_learned_by_nearby_cells_whose_anchor_fits_its_size() -> None:
    small = [0, 2, 2, 10, 10]  # centre (6, 6), 8x8: every stride-8 cell within 8 px; 40x40 is 5x
    rows, owners = assign(np.array([small], np.float64), _geometry())
    assert rows.tolist() == [0, 1, 2, 3] and owners.tolist() == [0] * 4
    large = [0, 0, 0, 30, 30]  # 30x30: 3x the small anchor, 0.75x the large one
    rows, owners = assign(np.array([small, large], np.float64), _geometry())
    assert rows.tolist() == [0, 1, 2, 3, 4]
    assert owners.tolist() == [0, 0, 0, 0, 1]  # each row to the box its anchor fits best
    far = [0, 100, 100, 108, 108]
    assert len(assign(np.array([far], np.float64), _geometry())[0]) == 0


def test_the_loss_falls_as_predictions_meet_the_boxes() -> None:
    geometry = _geometry()
    box = np.array([[1, 2, 2, 10, 10]], np.float64)  # class 1 of 2

    def rows(objectness: float, offset: float, class_score: float) -> torch.Tensor:
        out = torch.zeros(5, 7)
        out[:, 0:2] = torch.tensor([6.0 + offset, 6.0])
        out[:, 2:4] = 8.0
        out[:, 4] = 1e-3
        out[:4, 4] = objectness
        out[:, 5] = 1 - class_score
        out[:, 6] = class_score
        return out

    perfect = float(detection_loss(torch, rows(1.0, 0.0, 1.0), box, geometry, 2))
    shifted = float(detection_loss(torch, rows(1.0, 3.0, 1.0), box, geometry, 2))
    wrong_class = float(detection_loss(torch, rows(1.0, 0.0, 0.0), box, geometry, 2))
    unsure = float(detection_loss(torch, rows(0.2, 0.0, 1.0), box, geometry, 2))
    assert perfect < 0.01
    assert perfect < shifted and perfect < wrong_class and perfect < unsure


def test_the_geometry_of_yolov5n_is_its_strides_and_anchors(yolov5n_path: Path) -> None:
    from detc.compiler.detection.spec import spec_from_onnx
    from detc.passes.recover.labeled import row_geometry
    from detc.passes.torch_graph import TorchGraph

    spec = spec_from_onnx(yolov5n_path)
    graph = TorchGraph(ir.load(yolov5n_path).graph)
    heads = {f"/model.24/m.{i}/Conv_output_0": (1, 255, 80 >> i, 80 >> i) for i in range(3)}
    geometry = row_geometry(graph, heads, "output0", spec.input_name, (1, 3, 640, 640), torch)
    assert np.unique(geometry.strides).tolist() == [8.0, 16.0, 32.0]
    largest = np.unique(np.round(geometry.anchors[geometry.levels == 2]), axis=0).tolist()
    assert largest == [[116, 90], [156, 198], [373, 326]]  # YOLOv5's P5 anchors
    first_cell = geometry.centres[0].tolist()
    assert first_cell == [4.0, 4.0]


@pytest.fixture(scope="module")
def labeled_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 32x32 images with one or two boxes of category 7 each, COCO format."""
    root = tmp_path_factory.mktemp("labeled")
    (root / "images").mkdir()
    rng = np.random.default_rng(3)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(6):
        pixels = rng.uniform(0, 255, (32, 32, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        for j in range(1 + i % 2):
            box = [float(2 + 10 * j), float(3 + 8 * j), 12.0, 14.0]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i, "category_id": 7, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": 7, "name": "thing"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "instances.json").write_text(json.dumps(data))
    return root


def test_labels_join_the_end_to_end_step(
    tmp_path: Path, images: Path, labeled_dataset: Path
) -> None:
    teacher = tmp_path / "teacher.onnx"
    ir.save(tiny_decoded_detector(), teacher)
    student = damaged(tiny_decoded_detector(), noise=0.6)
    recover = run_recover(
        student, teacher, images, recipe="e2e", steps=4, lr=0.01, labels=labeled_dataset
    )
    report = recover.report
    assert report is not None
    (step,) = report.steps
    assert "with 6 labeled images" in step.detail


def test_labels_are_refused_where_the_decoder_is_not_yolov5(
    tmp_path: Path, images: Path, labeled_dataset: Path
) -> None:
    teacher = tmp_path / "teacher.onnx"
    ir.save(tiny_decoded_detector(), teacher)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"decoder": "yolov8"}))
    with pytest.raises(BadInputError, match="decoder yolov5"):
        run_recover(tiny_decoded_detector(), teacher, images, labels=labeled_dataset, spec=spec)
