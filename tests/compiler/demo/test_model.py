"""Demo detector: size budget, output layout, un-fused export, training, the shipped asset."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from detc.compiler.demo import synth
from detc.compiler.demo import train as demo_train
from detc.compiler.demo.model import (
    OUTPUT_NAME,
    STRIDES,
    DemoDetector,
    build_demo_model,
    count_flops,
    count_parameters,
    decode,
    export_onnx,
    parse_names_metadata,
)
from detc.compiler.detection.spec import load_spec, spec_from_onnx
from detc.compiler.reference import ort_session, run_session
from detc.compiler.tolerances import FP32_EXACT

ASSETS = Path(demo_train.__file__).resolve().parent.parent / "assets"
NUM_CLASSES = len(synth.class_names())


def _randomised_model(seed: int) -> DemoDetector:
    """A model whose BatchNorms carry non-trivial statistics, as a trained one would."""
    torch.manual_seed(seed)
    model = build_demo_model(NUM_CLASSES)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.1)
    return model.eval()


def test_size_and_cost_budget() -> None:
    model = build_demo_model(NUM_CLASSES)
    assert 1_000_000 <= count_parameters(model) <= 3_000_000
    assert count_flops(model, (256, 256)) <= 0.6e9


def test_output_is_yolov5_layout() -> None:
    model = _randomised_model(0)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(images)
    cells = sum((256 // s) ** 2 for s in STRIDES)
    assert output.shape == (1, cells, 5 + NUM_CLASSES)
    scores = output[..., 4:]
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    assert float(output[..., 2:4].min()) >= 0.0


def test_decode_places_zero_logits_at_cell_centres() -> None:
    """All-zero logits decode to each cell's centre with a box of 4 strides: row order is
    level by level (stride 8, 16, 32), row-major (y, x) inside a level."""
    levels = [torch.zeros(1, 5 + NUM_CLASSES, 64 // s, 96 // s) for s in STRIDES]
    rows = decode(levels)[0].numpy()
    start = 0
    for stride in STRIDES:
        height, width = 64 // stride, 96 // stride
        block = rows[start : start + height * width]
        ys, xs = np.divmod(np.arange(height * width), width)
        assert np.allclose(block[:, 0], (xs + 0.5) * stride)
        assert np.allclose(block[:, 1], (ys + 0.5) * stride)
        assert np.allclose(block[:, 2:4], 4.0 * stride)
        assert np.allclose(block[:, 4:], 0.5)
        start += height * width
    assert start == rows.shape[0]


def test_export_keeps_batchnorm_and_matches_torch(tmp_path: Path) -> None:
    model = _randomised_model(2)
    path = export_onnx(model, tmp_path / "demo.onnx", (256, 256), synth.class_names())
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(node.op_type for node in proto.graph.node)
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert ops["BatchNormalization"] == batchnorms > 0
    assert ops["Identity"] == 0
    assert proto.opset_import[0].version == 17
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert parse_names_metadata(metadata["names"]) == list(synth.class_names())
    assert metadata["names"].startswith("{0: 'circle'")
    assert metadata["stride"] == "32"
    [image_input] = proto.graph.input
    assert image_input.name == "images"
    assert [d.dim_value for d in image_input.type.tensor_type.shape.dim] == [1, 3, 256, 256]

    images = np.random.default_rng(3).random((1, 3, 256, 256), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    actual = run_session(ort_session(proto), {"images": images})[OUTPUT_NAME]
    assert actual.shape == expected.shape
    # within 1e-4 relative (coordinates are pixels up to 256, scores in [0, 1])
    np.testing.assert_allclose(actual, expected, rtol=FP32_EXACT.rtol, atol=FP32_EXACT.rtol)
    assert not model.training  # export leaves the model's mode as it found it


def test_every_positive_can_represent_its_box(rng: np.random.Generator) -> None:
    """The assignment only picks cells whose decode can reach the box exactly."""
    size = 256
    loss = demo_train.DetectionLoss(NUM_CLASSES, size)
    levels = [torch.zeros(2, 5 + NUM_CLASSES, size // s, size // s) for s in STRIDES]
    boxes, labels = [], []
    for _ in range(2):
        extent = rng.uniform(6, 120, size=(5, 2))
        corner = rng.uniform(0, 1, size=(5, 2)) * (size - extent)
        boxes.append(torch.from_numpy(np.concatenate([corner, corner + extent], 1)).float())
        labels.append(torch.from_numpy(rng.integers(0, NUM_CLASSES, 5)))
    batch_index, anchor_index, target_boxes, target_labels = loss._assign(levels, boxes, labels)
    grids, strides, _ = loss._anchors(levels)
    assert len(anchor_index) >= 10  # every box got at least one cell
    assert len(set(zip(batch_index.tolist(), anchor_index.tolist(), strict=True))) == len(
        anchor_index
    )
    stride = strides[anchor_index]
    centre = (target_boxes[:, :2] + target_boxes[:, 2:]) / 2
    wh = target_boxes[:, 2:] - target_boxes[:, :2]
    # cx = (2 p - 0.5 + g) s  and  w = (2 p)^2 4 s  need p in (0, 1)
    p_xy = (centre / stride[:, None] - grids[anchor_index] + 0.5) / 2
    p_wh = torch.sqrt(wh / (4 * stride[:, None])) / 2
    assert float(p_xy.min()) >= 0.0 and float(p_xy.max()) <= 1.0
    assert float(p_wh.min()) > 0.0 and float(p_wh.max()) < 1.0
    assert set(target_labels.tolist()) <= set(range(NUM_CLASSES))


def test_a_few_training_steps_reduce_the_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    images, boxes, labels = [], [], []
    for index in range(4):
        pixels, objects = synth.render_image(np.random.default_rng((21, index)), 128)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        xywh = np.array([o.bbox for o in objects], dtype=np.float32).reshape(-1, 4)
        boxes.append(torch.from_numpy(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)))
        labels.append(torch.tensor([o.class_index for o in objects], dtype=torch.int64))
    batch = torch.stack(images)
    model = build_demo_model(NUM_CLASSES)
    criterion = demo_train.DetectionLoss(NUM_CLASSES, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss, parts = criterion(model.forward_raw(batch), boxes, labels)
        assert all(np.isfinite(v) for v in parts.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_train_demo_writes_a_consistent_model_and_spec(tmp_path: Path) -> None:
    result = demo_train.train_demo(
        tmp_path / "out", n_train=16, n_val=4, image_size=64, batch_size=8, max_steps=2, log=None
    )
    assert result.steps == 2
    spec = load_spec(result.spec_path)
    payload = json.loads(result.spec_path.read_text())
    assert payload["trained"]["map50_val"] == pytest.approx(result.map50_val, abs=1e-4)
    assert payload["synth"] == {
        "image_size": 64,
        "val_seed": demo_train.val_seed(0),
        "n_val": 4,
        "train_seed": 0,
        "n_train": 16,
    }
    assert spec.input_size == (64, 64)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "demo_detector.json",
        "demo_detector.onnx",
    ]  # the temporary data folder is gone


def test_shipped_asset_is_consistent_with_its_spec() -> None:
    onnx_path = ASSETS / "demo_detector.onnx"
    spec_path = ASSETS / "demo_detector.json"
    assert onnx_path.stat().st_size <= 10 * 1024 * 1024
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    assert Counter(n.op_type for n in proto.graph.node)["BatchNormalization"] > 0
    spec = load_spec(spec_path)
    payload = json.loads(spec_path.read_text())
    inferred = spec_from_onnx(proto)
    assert inferred.input_name == spec.input_name == "images"
    assert inferred.input_size == spec.input_size
    assert inferred.class_names == spec.class_names == synth.class_names()
    assert spec.category_ids == tuple(synth.category_ids())
    assert spec.decoder == "demo" and spec.resize == "letterbox" and spec.pad_value == 114
    [output] = proto.graph.output
    height, width = spec.input_size
    cells = sum((height // s) * (width // s) for s in STRIDES)
    assert output.name == OUTPUT_NAME
    assert [d.dim_value for d in output.type.tensor_type.shape.dim] == [
        1,
        cells,
        5 + len(spec.class_names),
    ]
    assert payload["synth"]["image_size"] == height == width
    assert payload["trained"]["map50_val"] >= 0.8


def test_shipped_asset_detects_fresh_synthetic_shapes(tmp_path: Path) -> None:
    """On unseen images of the val distribution the shipped detector finds the shapes."""
    spec = load_spec(ASSETS / "demo_detector.json")
    payload = json.loads((ASSETS / "demo_detector.json").read_text())
    size = payload["synth"]["image_size"]
    # a seed neither the training nor the val split used
    data = synth.generate_dataset(tmp_path / "fresh", 12, seed=987_654, image_size=size)
    metrics = demo_train.evaluate_onnx(ASSETS / "demo_detector.onnx", data, spec)
    assert metrics["map50"] >= 0.7
