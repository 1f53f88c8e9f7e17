"""detc verify on int8 artifacts: the compile records the quantization and saves the QDQ model;
verify holds the artifact to that quantized reference (int8 criterion) and, with --data, holds
its mAP to the float model's within the budget, naming the layers kept in float."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import detc
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.reference import ort_session, run_session
from detc.compiler.verify.detection import DEFAULT_INT8_MAP_BUDGET, map_budget
from detc.compiler.verify.quantization import quantization_record
from detc.compiler.verify.tensors import (
    INT8_MAX_SQNR_LOSS_DB,
    INT8_SCALE_JITTER,
    Int8Agreement,
    QuantizedTensorReport,
    jittered_reference,
    verify_quantized_tensors,
)

SIDE = 32
CLASSES = ("person", "car")
#: the head stays float: the report must name it, with the reason
FLOAT_LAYER = "head"
SPEC = ModelSpec(input_size=(SIDE, SIDE), class_names=CLASSES, decoder="yolov5")


def _tiny_detector(rng: np.random.Generator) -> onnx.ModelProto:
    """images (1,3,32,32) → Conv-SiLU s2 → Conv-SiLU → 1x1 head → YOLOv5 rows (1, 256, 7)."""
    rows = 5 + len(CLASSES)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.3, 8).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (rows, 8, 1, 1)).astype(np.float32), "wh"),
        numpy_helper.from_array(rng.normal(0, 0.3, rows).astype(np.float32), "bh"),
        numpy_helper.from_array(np.array([1, rows, -1], np.int64), "flat"),
        numpy_helper.from_array(
            np.array([SIDE, SIDE, SIDE, SIDE] + [1.0] * (rows - 4), np.float32), "to_pixels"
        ),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["images", "w1", "b1"], ["c1"], name="c1", pads=[1] * 4, strides=[2, 2]
        ),
        helper.make_node("Sigmoid", ["c1"], ["g1"], name="g1"),
        helper.make_node("Mul", ["c1", "g1"], ["a1"], name="silu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="c2", pads=[1] * 4),
        helper.make_node("Sigmoid", ["c2"], ["g2"], name="g2"),
        helper.make_node("Mul", ["c2", "g2"], ["a2"], name="silu2"),
        helper.make_node("Conv", ["a2", "wh", "bh"], ["h"], name=FLOAT_LAYER),
        helper.make_node("Reshape", ["h", "flat"], ["hf"], name="flatten"),
        helper.make_node("Transpose", ["hf"], ["ht"], name="rows", perm=[0, 2, 1]),
        helper.make_node("Sigmoid", ["ht"], ["hs"], name="squash"),
        helper.make_node("Mul", ["hs", "to_pixels"], ["output0"], name="decode"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 256, rows])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tiny_coco(root: Path, rng: np.random.Generator) -> Path:
    """A COCO folder of 6 textured 48x40 images with a box or two each (also the calib set)."""
    (root / "images").mkdir(parents=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for image_id in range(1, 7):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 48, "height": 40})
        for _ in range(1 + image_id % 2):
            x, y = (float(v) for v in rng.uniform(0, 24, 2))
            w, h = (float(v) for v in rng.uniform(8, 20, 2))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, 3)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    (root / "instances.json").write_text(json.dumps(document))
    return root


def detc_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(float model, COCO folder, int8 artifact compiled with the head excluded)."""
    root = tmp_path_factory.mktemp("verify_int8")
    rng = np.random.default_rng(0)
    model_path = root / "tiny.onnx"
    onnx.save(_tiny_detector(rng), model_path)
    data = _tiny_coco(root / "coco", rng)
    artifact = root / "art"
    detc.compile_model(
        model_path,
        target="x86",
        out_dir=artifact,
        pipeline=f"quantize{{calib={data},exclude={FLOAT_LAYER}}}",
        model_spec=SPEC,
        progress=False,
    )
    return model_path, data, artifact


def test_compile_records_quantization_and_saves_the_qdq_reference(
    int8_build: tuple[Path, Path, Path],
) -> None:
    _, _, artifact = int8_build
    manifest = json.loads((artifact / "manifest.json").read_text())
    record = quantization_record(manifest)
    assert record is not None and record["origin"] == "pass"
    assert record["method"] == "percentile" and record["max_map_drop"] is None
    assert (record["layers"], record["quantized"]) == (3, 2)
    assert [(k["name"], k["op_type"]) for k in record["kept_float"]] == [(FLOAT_LAYER, "Conv")]
    assert "exclude" in record["kept_float"][0]["reason"]
    reference = artifact / record["reference"]["file"]
    assert hashlib.sha256(reference.read_bytes()).hexdigest() == record["reference"]["sha256"]
    qdq = onnx.load(reference)
    dequantized = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    reads_dq = {n.name for n in qdq.graph.node if any(i in dequantized for i in n.input)}
    assert {"c1", "c2"} <= reads_dq and FLOAT_LAYER not in reads_dq


def test_a_float_artifact_has_no_quantization_record(tmp_path: Path) -> None:
    model_path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_detector(np.random.default_rng(0)), model_path)
    result = detc.compile_model(model_path, out_dir=tmp_path / "art", progress=False)
    assert "quantization" not in result.manifest
    assert not (tmp_path / "art" / "reference_qdq.onnx").exists()


def test_verify_holds_the_int8_artifact_to_its_quantized_reference(
    int8_build: tuple[Path, Path, Path],
) -> None:
    model_path, _, artifact = int8_build
    result = detc_cli("verify", str(artifact), "--runs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: ok" in result.stdout and "SQNR vs QDQ" in result.stdout
    assert f"{FLOAT_LAYER} (Conv): " in result.stdout  # the layer kept in float, and why
    verification = detc.verify_artifact(artifact, runs=2)
    assert verification.ok and isinstance(verification.tensors, QuantizedTensorReport)
    assert verification.quantization is not None
    kept = f"    {FLOAT_LAYER} (Conv): "
    assert any(line.startswith(kept) for line in verification.tensor_lines())
    report = verify_quantized_tensors(artifact, model_path, runs=2)
    (output,) = report.outputs
    assert report.ok and output.sqnr_db >= output.least_sqnr_db
    assert output.sqnr_loss_db is not None and output.sqnr_loss_db <= INT8_MAX_SQNR_LOSS_DB
    # the float model is not what it is held to: against it, int8 is far off element-wise
    feeds = {"images": np.random.default_rng(0).random((1, 3, SIDE, SIDE), dtype=np.float32)}
    exact = run_session(ort_session(onnx.load(model_path)), feeds)["output0"]
    assert not np.allclose(detc.load(artifact)(**feeds)["output0"], exact, rtol=1e-3, atol=1e-3)


def _with_activation_zero_point_off_by_one(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """The classic int8 back-end bug: one activation dequantized with zero point + 1."""
    broken = onnx.ModelProto()
    broken.CopyFrom(qdq)
    initializers = {t.name: t for t in broken.graph.initializer}
    node = next(
        n
        for n in broken.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].startswith("a1")
    )
    zero_point = numpy_helper.to_array(initializers[node.input[2]])
    shifted = (zero_point.astype(np.int32) + 1).astype(zero_point.dtype)
    broken.graph.initializer.append(numpy_helper.from_array(shifted, "shifted_zero_point"))
    node.input[2] = "shifted_zero_point"
    return broken


def test_an_artifact_computing_something_else_exits_3(
    int8_build: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model_path, _, artifact = int8_build
    good_reference = artifact / "reference_qdq.onnx"
    broken_path = tmp_path / "broken_qdq.onnx"
    onnx.save(_with_activation_zero_point_off_by_one(onnx.load(good_reference)), broken_path)
    # compiled from an already-quantized model: recorded as such, with itself as reference
    broken = tmp_path / "broken_art"
    result = detc.compile_model(broken_path, out_dir=broken, pipeline="", progress=False)
    assert result.manifest["quantization"]["origin"] == "source"
    assert verify_quantized_tensors(broken, None).ok
    # ... then handed the right reference: the artifact computes a different quantized model
    shutil.copyfile(good_reference, broken / "reference_qdq.onnx")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["quantization"]["reference"]["sha256"] = hashlib.sha256(
        good_reference.read_bytes()
    ).hexdigest()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    report = verify_quantized_tensors(broken, model_path, runs=2)
    assert not report.ok
    cli = detc_cli("verify", str(broken), "--reference", str(model_path), "--runs", "2")
    assert cli.returncode == 3, cli.stdout + cli.stderr
    assert "MISMATCH" in cli.stdout and "disagree with the quantized reference" in cli.stderr


def test_a_reference_that_is_not_the_compiled_one_is_bad_input(
    int8_build: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, _, artifact = int8_build
    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    qdq = onnx.load(copy / "reference_qdq.onnx")
    onnx.save(_with_activation_zero_point_off_by_one(qdq), copy / "reference_qdq.onnx")
    result = detc_cli("verify", str(copy))
    assert result.returncode == 2 and "sha256" in result.stderr


def test_verify_with_data_compares_float_qdq_and_artifact(
    int8_build: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, data, artifact = int8_build
    report_dir = tmp_path / "report"
    args = ["verify", str(artifact), "--data", str(data), "--report-dir", str(report_dir)]
    result = detc_cli(*args, "--min-reference-map", "0")  # random weights find nothing
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((report_dir / "quantization.json").read_text())
    assert summary["ok"] is True and summary["budget_source"] == "default"
    assert summary["max_map_drop"] == DEFAULT_INT8_MAP_BUDGET
    assert set(summary["maps"]) == {"float", "quantized_reference", "artifact"}
    assert summary["agreement_with_quantized_reference"]["images"] == 6
    assert [k["name"] for k in summary["quantization"]["kept_float"]] == [FLOAT_LAYER]
    markdown = (report_dir / "report.md").read_text()
    assert "## int8 artifact" in markdown and f"{FLOAT_LAYER} (Conv)" in markdown
    assert (report_dir / "vs_quantized_reference" / "report.md").is_file()
    assert "mAP drop against float" in result.stderr + result.stdout


def test_verify_with_data_runs_each_model_once_per_image(
    int8_build: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The float model, the QDQ reference, its jittered copy and the artifact each run once
    per image (the two comparisons share their outputs; they used to run the float model and
    the artifact twice)."""
    from detc.compiler.verify import detection as detection_verify
    from detc.targets.runtime import CompiledModel

    model_path, data, artifact = int8_build
    calls = {"onnxruntime": 0, "artifact": 0}
    count_session = detection_verify.run_session
    count_artifact = CompiledModel.run

    def counted_session(*args: object, **kwargs: object) -> object:
        calls["onnxruntime"] += 1
        return count_session(*args, **kwargs)

    def counted_artifact(self: CompiledModel, feeds: object) -> object:
        calls["artifact"] += 1
        return count_artifact(self, feeds)

    monkeypatch.setattr(detection_verify, "run_session", counted_session)
    monkeypatch.setattr(CompiledModel, "run", counted_artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    report = detection_verify.verify_quantized_detection(
        artifact, model_path, manifest, data, progress=False
    )
    images = report.versus_float.num_images
    assert images == 6 and report.versus_quantized.num_images == images
    assert calls == {"onnxruntime": 3 * images, "artifact": images}


def test_an_over_budget_drop_names_the_other_approximate_passes(
    int8_build: tuple[Path, Path, Path],
) -> None:
    """The float reference is the source model: a prune before the quantize counts in the drop,
    and the message must say so (else quantization takes the blame for the prune)."""
    from detc.compiler.verify import detection as detection_verify

    model_path, data, artifact = int8_build
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (
        detection_verify.verify_quantized_detection(
            artifact, model_path, manifest, data, max_map_drop=-1.0, progress=False
        )
        .failures()[0]
        .endswith("(> -1, --max-map-drop)")
    )
    pruned = {"pass": "prune{ratio=0.5}", "exact": False, "modified": True}
    manifest["passes"] = [pruned, *manifest["passes"]]
    report = detection_verify.verify_quantized_detection(
        artifact, model_path, manifest, data, max_map_drop=-1.0, progress=False
    )
    assert "it includes prune{ratio=0.5}: --max-map-drop sets" in report.failures()[0]
    assert "the drop includes prune{ratio=0.5}" in report.render_table()


def test_map_budget_prefers_the_flag_then_the_compile_then_the_default() -> None:
    assert map_budget({"max_map_drop": 0.5}, 2.0) == (2.0, "--max-map-drop")
    assert map_budget({"max_map_drop": 0.5}, None) == (0.5, "the compile's max_map_drop")
    assert map_budget({"max_map_drop": None}, None) == (DEFAULT_INT8_MAP_BUDGET, "default")


def test_agreement_is_per_channel_and_flags_missing_or_reshaped_outputs() -> None:
    rng = np.random.default_rng(5)
    # channel 0 in pixels (hundreds), channel 1 a score (0..1): an error of 0.1 in each is
    # nothing to the first channel and 20 dB of noise to the second; the mean weighs both
    reference = np.stack([rng.uniform(100, 300, 50), rng.uniform(0, 1, 50)], axis=1)[None]
    noisy = reference + np.array([0.0, 0.1])
    agreement = Int8Agreement()
    agreement.add({"y": noisy}, {"y": reference}, {"y": reference})
    (output,) = agreement.results()
    signal = float(np.sum(reference[0, :, 1] ** 2))
    expected = (200.0 + 10 * np.log10(signal / (50 * 0.01))) / 2
    assert output.sqnr_db == pytest.approx(expected, rel=1e-9)
    assert output.artifact_float_sqnr_db is None and output.sqnr_loss_db is None
    assert output.ok  # an exact jittered reference asks for float precision, not for 200 dB
    missing = Int8Agreement()
    missing.add({}, {"y": reference}, {"y": reference})
    reshaped = Int8Agreement()
    reshaped.add({"y": reference[0]}, {"y": reference}, {"y": reference})
    assert not missing.results()[0].ok and "missing" in missing.results()[0].problem
    assert not reshaped.results()[0].ok and "shape" in reshaped.results()[0].problem


def test_jitter_moves_only_activation_scales(int8_build: tuple[Path, Path, Path]) -> None:
    _, _, artifact = int8_build
    qdq = onnx.load(artifact / "reference_qdq.onnx")
    before = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in jittered_reference(qdq).graph.initializer}
    activations = {
        n.input[1]
        for n in qdq.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] not in before
    }
    assert activations  # images and a1 (the input of c2) at least
    for name, values in before.items():
        factor = 1.0 + INT8_SCALE_JITTER if name in activations else 1.0
        np.testing.assert_allclose(after[name], values * factor, rtol=1e-7)


def test_a_reference_that_finds_nothing_fails_naming_preprocessing_and_decoder(
    int8_build: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, data, artifact = int8_build
    report_dir = tmp_path / "report"
    result = detc_cli("verify", str(artifact), "--data", str(data), "--report-dir", str(report_dir))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "reference model finds almost nothing" in result.stderr
    assert "preprocessing (RGB 0..1 (/255), letterbox 32x32" in result.stderr
    assert "decoder (yolov5)" in result.stderr and "--decoder" in result.stderr
    assert "preprocessing: RGB 0..1 (/255)" in result.stdout  # printed with the table
