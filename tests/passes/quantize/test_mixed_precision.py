"""Sensitivity ranking and mixed precision (`passes.quantize.mixed_precision`), `detc quant-report`.

The fixture is a tiny "detector" whose middle Conv 'b' is deliberately hard to quantize: the
Conv 'a' before it writes one channel offset by +500, which the per-tensor activation range of
b's input must cover, so the seven channels that carry the signal fall below one 8-bit step.
Its decoder calls a class in every 4x4-pixel cell; the dataset's ground truth is the float
model's confident calls, so the float model scores mAP 1.0 and what quantization flips shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import helper
from PIL import Image

from detc.compiler.cli.quant import quant_report
from detc.compiler.detection.decoders import Detections, register_decoder
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError
from detc.passes.quantize.calibrate import Calibration
from detc.passes.quantize.core import QuantizeOptions, QuantizePass
from detc.passes.quantize.mixed_precision import (
    LayerSensitivity,
    channel_axis,
    channel_sqnr_db,
    cosine,
    layer_sensitivity,
    mixed_precision,
    rank_layers,
    sqnr_db,
)
from detc.passes.quantize.qdq import quantized_nodes
from tests._models import make_model, run_ort, value_info

SIZE = 16
CELL = 4
CLASSES = 4
OFFSET = 500.0
#: a cell enters the ground truth when the float model gives its class this probability
CONFIDENT = 0.9
DECODER = "detc-test-cells"


def decode_cells(outputs: Mapping[str, np.ndarray], spec: ModelSpec) -> Detections:
    """One detection per 4x4 cell: the arg-max class, scored by its softmax probability."""
    logits = next(iter(outputs.values()))[0].astype(np.float64)  # (classes, rows, cols)
    probabilities = np.exp(logits - logits.max(axis=0))
    probabilities /= probabilities.sum(axis=0)
    rows, cols = logits.shape[1:]
    boxes, scores, classes = [], [], []
    for i in range(rows):
        for j in range(cols):
            boxes.append([j * CELL, i * CELL, (j + 1) * CELL, (i + 1) * CELL])
            classes.append(int(np.argmax(probabilities[:, i, j])))
            scores.append(float(probabilities[:, i, j].max()))
    return Detections(np.asarray(boxes), np.asarray(scores), np.asarray(classes))


register_decoder(DECODER, decode_cells)


def cell_model(rng: np.random.Generator, *, offset: float = OFFSET) -> onnx.ModelProto:
    """x (3, 16, 16) -> Conv 'a' (8 ch, stride 2) -> Conv 'b' (stride 2) -> Conv 'c' -> y (4, 4, 4).

    a's channel 0 carries +``offset``; b reads it through a tiny weight, so b's output (and the
    model) hardly depend on it, but b's input range is set by it.
    """
    a_w = rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)
    a_b = rng.normal(0, 0.2, 8).astype(np.float32)
    a_b[0] += offset
    b_w = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    b_w[:, 0] *= 1e-3
    c_w = rng.normal(0, 1.0, (CLASSES, 8, 1, 1)).astype(np.float32)
    c_b = np.zeros(CLASSES, np.float32)
    inits = {"a_w": a_w, "a_b": a_b, "b_w": b_w, "c_w": c_w, "c_b": c_b}
    nodes = [
        helper.make_node(
            "Conv", ["x", "a_w", "a_b"], ["a"], name="a", strides=[2, 2], pads=[1] * 4
        ),
        helper.make_node("Conv", ["a", "b_w"], ["b"], name="b", strides=[2, 2], pads=[1] * 4),
        helper.make_node("Conv", ["b", "c_w", "c_b"], ["y"], name="c"),
    ]
    model = make_model(
        nodes,
        [value_info("x", np.float32, [1, 3, SIZE, SIZE])],
        [value_info("y", np.float32, [1, CLASSES, SIZE // CELL, SIZE // CELL])],
        inits,
    )
    return ir.serde.serialize_model(model)


def _image(rng: np.random.Generator) -> Image.Image:
    # smooth-ish images: a random colour per 4x4 block plus mild noise
    blocks = rng.integers(0, 256, (SIZE // CELL, SIZE // CELL, 3))
    pixels = np.kron(blocks, np.ones((CELL, CELL, 1))) + rng.normal(0, 12, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_dataset(folder: Path, model: onnx.ModelProto, count: int, seed: int) -> Path:
    """A COCO dataset whose ground truth is ``model``'s confident calls (images 16x16, unscaled)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for index in range(count):
        image = _image(rng)
        name = f"{index:03d}.png"
        image.save(folder / "images" / name)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
        found = decode_cells(run_ort(model, {"x": pixels}), ModelSpec())
        images.append({"id": index + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for box, score, label in zip(found.boxes, found.scores, found.class_ids, strict=True):
            if score < CONFIDENT:
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": f"class{k}"} for k in range(CLASSES)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "instances.json").write_text(json.dumps(document))
    return folder


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model path, COCO dataset folder) of the cell detector."""
    folder = tmp_path_factory.mktemp("cells")
    model = cell_model(np.random.default_rng(7))
    path = folder / "cells.onnx"
    onnx.save(model, path)
    return path, write_dataset(folder / "data", model, count=12, seed=11)


# --- measures -----------------------------------------------------------------------------------


def test_sqnr_and_cosine_by_hand() -> None:
    signal = np.array([3.0, 4.0])  # energy 25
    noisy = signal + np.array([0.03, -0.04])  # noise energy 0.0025: 10 log10(1e4) = 40 dB
    assert sqnr_db([signal], [noisy]) == pytest.approx(40.0)
    assert sqnr_db([signal], [signal]) == math.inf
    assert cosine([signal], [2 * signal]) == pytest.approx(1.0)
    assert cosine([np.array([1.0, 0.0])], [np.array([0.0, 1.0])]) == pytest.approx(0.0)
    # channels on the short axis (2 of 3 x 2): box-like values in one, score-like in the other;
    # whole-tensor SQNR is the boxes', the channel mean counts the scores' 20 dB as much
    reference = np.array([[[300.0, 0.5], [400.0, 0.5], [0.0, 0.0]]])
    noise = np.array([[[3.0, 0.05], [-4.0, -0.05], [0.0, 0.0]]])  # 40 dB and 20 dB
    assert channel_axis(reference.shape) == 2
    assert channel_sqnr_db([reference], [reference + noise]) == pytest.approx(30.0)
    assert sqnr_db([reference], [reference + noise]) == pytest.approx(40.0, abs=0.01)


def test_ranking_orders_by_sqnr_or_map_and_map_needs_measurements() -> None:
    layers = [
        LayerSensitivity("p", "Conv", 1, 0.5, 30.0, 0.99, -0.5),
        LayerSensitivity("q", "Conv", 1, 0.5, 20.0, 0.98, -0.1),
        LayerSensitivity("r", "Conv", 1, 0.5, 40.0, 0.999, -2.0),
    ]
    assert [s.name for s in rank_layers(layers, "sqnr")] == ["q", "p", "r"]
    assert [s.name for s in rank_layers(layers, "map")] == ["r", "p", "q"]
    unmeasured = [LayerSensitivity("p", "Conv", 1, 1.0, 30.0, 0.99)]
    with pytest.raises(BadInputError, match="rank_by=map needs"):
        rank_layers(unmeasured, "map")


# --- sensitivity ----------------------------------------------------------------------------------


def test_the_layer_with_an_outlier_laden_input_ranks_first(cells: tuple[Path, Path]) -> None:
    model, data = cells
    report = layer_sensitivity(
        model,
        Calibration(calib=data, method="minmax", calib_images=8),
        data=data,
        decoder=DECODER,
        rank_by="map",
    )
    by_name = {s.name: s for s in report.layers}
    assert set(by_name) == {"a", "b", "c"}
    assert report.float_map == pytest.approx(1.0)  # the ground truth is the float model's calls
    assert report.rank_by == "map"
    assert report.layers[0].name == "b"
    # b alone wrecks the outputs; a and c alone barely move them
    assert by_name["b"].sqnr_db < 15.0
    assert min(by_name["a"].sqnr_db, by_name["c"].sqnr_db) > 30.0
    assert by_name["b"].map_delta is not None and by_name["b"].map_delta < -20.0
    for name in ("a", "c"):
        delta = by_name[name].map_delta
        assert delta is not None and delta > -5.0
    shares = [s.mac_share for s in report.layers]
    assert sum(shares) == pytest.approx(1.0)
    # the same ranking from the cheap measurement alone
    cheap = layer_sensitivity(model, Calibration(calib=data, method="minmax", calib_images=8))
    assert cheap.rank_by == "sqnr" and cheap.layers[0].name == "b"
    assert all(s.map_delta is None for s in cheap.layers)
    table = report.table()
    assert "b" in table.splitlines()[3] and "mAP delta" in table


def test_mixed_precision_keeps_the_hard_layer_in_float(cells: tuple[Path, Path]) -> None:
    model, data = cells
    result = mixed_precision(
        model,
        Calibration(calib=data, method="minmax"),
        data=data,
        decoder=DECODER,
        max_map_drop=5.0,
    )
    assert 100 * (result.float_map - result.fully_quantized_map) > 5.0  # the budget binds
    assert [s.name for s in result.kept_float] == ["b"]
    assert result.map_drop <= 5.0
    assert quantized_nodes(result.model) == {"a", "c"}
    # what it reports is what the returned model scores
    assert result.trials[0].kept_float == 0 and result.trials[-1].map == result.map
    graph_io = [(v.name, v.type.tensor_type.elem_type) for v in result.model.graph.output]
    assert graph_io == [("y", onnx.TensorProto.FLOAT)]


def test_mixed_precision_with_room_to_spare_keeps_everything_int8(
    cells: tuple[Path, Path],
) -> None:
    model, data = cells
    result = mixed_precision(
        model,
        Calibration(calib=data, method="minmax"),
        data=data,
        decoder=DECODER,
        max_map_drop=100.0,
    )
    assert result.kept_float == [] and len(result.trials) == 1
    assert quantized_nodes(result.model) == {"a", "b", "c"}


def test_the_pass_option_max_map_drop_runs_mixed_precision(cells: tuple[Path, Path]) -> None:
    model_path, data = cells
    model = ir.load(model_path)
    pass_ = QuantizePass(
        QuantizeOptions(calib=data, method="minmax", max_map_drop=5.0, decoder=DECODER)
    )
    assert pass_(model).modified
    report = pass_.report
    assert report is not None and report.float_map == pytest.approx(1.0)
    assert report.quantized_map is not None and 100 * (1.0 - report.quantized_map) <= 5.0
    kept = {d.name: d.reason for d in report.layers if not d.quantized}
    assert list(kept) == ["b"] and "kept float by max_map_drop=5.0" in kept["b"]
    assert quantized_nodes(ir.serde.serialize_model(model)) == {"a", "c"}


def test_max_map_drop_needs_a_coco_dataset(cells: tuple[Path, Path], tmp_path: Path) -> None:
    model_path, data = cells
    plain = tmp_path / "plain"
    plain.mkdir()
    for image in (data / "images").iterdir():
        (plain / image.name).write_bytes(image.read_bytes())
    pass_ = QuantizePass(QuantizeOptions(calib=plain, max_map_drop=1.0, decoder=DECODER))
    with pytest.raises(BadInputError, match=r"has no instances\.json: give data=DIR"):
        pass_(ir.load(model_path))


# --- the CLI ------------------------------------------------------------------------------------


def test_quant_report_prints_the_ranking_and_plots_it(
    cells: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = cells
    plot = tmp_path / "sensitivity.png"
    runner = CliRunner()
    common = [str(model), "--data", str(data), "--decoder", DECODER, "--method", "minmax"]
    result = runner.invoke(quant_report, [*common, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line[:3].strip().isdigit()]
    assert rows[0][1] == "b" and sorted(row[1] for row in rows) == ["a", "b", "c"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = runner.invoke(quant_report, [*common, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["layers"][0]["name"] == "b"
    assert {"name", "op_type", "mac_share", "sqnr_db", "map_delta"} <= set(document["layers"][0])


def test_quant_report_refuses_a_model_it_cannot_read(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    result = CliRunner().invoke(quant_report, [str(broken), "--calib", str(tmp_path)])
    assert isinstance(result.exception, BadInputError), result.output


def test_sensitivity_of_a_model_without_quantizable_layers_is_refused(
    cells: tuple[Path, Path],
) -> None:
    _, data = cells
    plain = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [value_info("x", np.float32, [1, 3, SIZE, SIZE])],
        [value_info("y", np.float32, [1, 3, SIZE, SIZE])],
    )
    with pytest.raises(BadInputError, match="no Conv/Gemm/MatMul layer to quantize"):
        layer_sensitivity(plain, Calibration(calib=data))
