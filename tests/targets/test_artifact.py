"""The artifact directory: layout, manifest, atomic (re)writes, and the loader's refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.errors import BadInputError, UnsupportedModelError
from detc.compiler.tolerances import FP32_EXACT
from detc.targets import TuningOptions, build_artifact, load_artifact, read_manifest
from detc.targets.cpu import REQUIRED_FLAGS, detect_host_cpu, missing_flags
from detc.targets.x86.target import X86Target

CALLER_FIELDS = {
    "pipeline": "fold-conv-bn",
    "source": {"path": "tiny.onnx", "sha256": "0" * 64},
    "detc_version": "0.1.0",
}


def tiny_model(seed: int) -> onnx.ModelProto:
    """Conv → Sigmoid → Split into two named outputs; weights from ``seed``."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["s"], name="act"),
            helper.make_node("Split", ["s", "parts"], ["scores", "boxes"], name="split", axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, 8, 8]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 8, 8]),
        ],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([2, 4], np.int64), "parts"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unsupported_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Col2Im", ["x", "s", "k"], ["y"], name="fold")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([3, 3], np.int64), "s"),
            numpy_helper.from_array(np.array([1, 1], np.int64), "k"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


#: the artifact format with parameters beside the library: x86's plain pipeline (the default
#: blocked one binds the weights into model.so, see tests/targets/x86)
PLAIN = TuningOptions(tune=False, layout="plain")


def _build(model: onnx.ModelProto, out_dir: Path, **fields: object) -> dict:
    return build_artifact(
        model,
        "x86",
        out_dir,
        manifest_fields={**CALLER_FIELDS, **fields},
        progress=False,
        tuning=PLAIN,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("built") / "tiny.detc"
    _build(tiny_model(0), out_dir)
    return out_dir


@pytest.fixture
def copy_of_built(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.detc"
    shutil.copytree(built, copy)
    return copy


def _siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir())


# ---- layout and manifest -------------------------------------------------------------------


def test_layout_and_manifest(built: Path) -> None:
    assert sorted(p.name for p in built.iterdir()) == ["manifest.json", "model.so", "params.npz"]
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format"] == "detc-artifact" and manifest["format_version"] == 1
    assert manifest["target"]["name"] == "x86"
    assert manifest["target"]["tvm_target"]["kind"] == "llvm"
    assert manifest["target"]["tvm_target"]["mcpu"] == detect_host_cpu().mcpu
    assert manifest["target"]["host_cpu"]["physical_cores"] == detect_host_cpu().physical_cores
    assert manifest["library"] == "model.so"
    assert manifest["calling_convention"] == "inputs+params"
    assert manifest["inputs"] == [{"name": "image", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"] == [
        {"name": "scores", "shape": [1, 2, 8, 8], "dtype": "float32"},
        {"name": "boxes", "shape": [1, 4, 8, 8], "dtype": "float32"},
    ]
    assert manifest["tuning"]["tuned"] is False and manifest["tuning"]["trials"] == 0
    assert manifest["tuning"]["database_digest"] is None
    assert manifest["tuning"]["untuned_tasks"] >= 1
    assert set(manifest["versions"]) == {"tvm", "tvm_ffi", "onnx", "numpy"}
    library_digest = hashlib.sha256((built / "model.so").read_bytes()).hexdigest()
    assert manifest["library_sha256"] == library_digest
    # reproducible: no date (unless SOURCE_DATE_EPOCH gives one) and no build times
    assert "built_at" not in manifest and "seconds" not in manifest["build"]
    assert all(set(phase) == {"name", "summary"} for phase in manifest["build"]["phases"])
    for key, value in CALLER_FIELDS.items():
        assert manifest[key] == value
    assert read_manifest(built) == manifest


def test_params_file_holds_mains_parameters_in_order(built: Path) -> None:
    manifest = read_manifest(built)
    with np.load(built / "params.npz") as archive:
        keys = sorted(archive.files)
        arrays = [archive[k] for k in keys]
    assert manifest["params"] == {"file": "params.npz", "count": len(keys)}
    assert keys == [f"p{i:05d}" for i in range(len(keys))]
    initializers = {t.name: numpy_helper.to_array(t) for t in tiny_model(0).graph.initializer}
    # Relax keeps the weight and the bias as parameters (the Split sizes become constants).
    np.testing.assert_array_equal(arrays[0], initializers["w"])
    np.testing.assert_array_equal(arrays[1], initializers["b"])


def test_caller_may_not_override_owned_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        build_artifact(tiny_model(0), "x86", tmp_path / "a", manifest_fields={"format": "x"})
    assert list(tmp_path.iterdir()) == []


def test_unknown_target_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"unknown target 'sparc'; known targets: arm, .*x86"):
        build_artifact(tiny_model(0), "sparc", tmp_path / "b", manifest_fields={})
    assert list(tmp_path.iterdir()) == []


def test_dynamic_input_is_refused_with_the_flag_that_fixes_it(tmp_path: Path) -> None:
    model = tiny_model(0)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[2].dim_param = "batch", "height"
    with pytest.raises(
        BadInputError,
        match=r"'image' is batchx3xheightx8.*--input-shape image:1x3xNx8",
    ):
        build_artifact(model, "x86", tmp_path / "d", manifest_fields={})
    assert list(tmp_path.iterdir()) == []


# ---- atomic writes -------------------------------------------------------------------------


def test_failed_build_leaves_no_directory_and_no_temp(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError):
        _build(unsupported_model(), tmp_path / "out.detc")
    assert list(tmp_path.iterdir()) == []


def test_failed_build_keeps_the_previous_artifact(copy_of_built: Path) -> None:
    before = (copy_of_built / "manifest.json").read_bytes()
    with pytest.raises(UnsupportedModelError):
        _build(unsupported_model(), copy_of_built)
    assert (copy_of_built / "manifest.json").read_bytes() == before
    assert _siblings(copy_of_built) == ["copy.detc"]


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: X86Target, ctx: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(X86Target, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_model(0), tmp_path / "out.detc")
    assert list(tmp_path.iterdir()) == []


def test_second_compile_replaces_the_artifact(copy_of_built: Path) -> None:
    old_manifest = read_manifest(copy_of_built)
    new_manifest = _build(tiny_model(1), copy_of_built, pipeline="second")
    assert read_manifest(copy_of_built) == new_manifest
    assert new_manifest["pipeline"] == "second"
    # Weights live in params.npz, so the same graph with other weights gives the same library.
    assert new_manifest["library_sha256"] == old_manifest["library_sha256"]
    assert _siblings(copy_of_built) == ["copy.detc"]  # neither the temp nor the old copy remain
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(
        tiny_model(1).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    expected = session.run(["boxes"], {"image": x})[0]
    actual = load_artifact(copy_of_built, num_threads=1)(x)["boxes"]
    np.testing.assert_allclose(actual, expected, rtol=FP32_EXACT.rtol, atol=FP32_EXACT.atol)


def test_a_directory_that_is_not_an_artifact_is_never_replaced(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="not a detc artifact"):
        _build(tiny_model(0), precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert _siblings(precious) == ["home"]


# ---- loading -------------------------------------------------------------------------------


def test_loaded_model_checks_its_feeds(built: Path) -> None:
    model = load_artifact(built, num_threads=1)
    assert model.input_names == ["image"] and model.output_names == ["scores", "boxes"]
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    by_name = model.run({"image": x})
    np.testing.assert_array_equal(model(x)["boxes"], by_name["boxes"])
    np.testing.assert_array_equal(model(image=x)["scores"], by_name["scores"])
    with pytest.raises(BadInputError, match=r"missing \['image'\], unknown \['images'\]"):
        model.run({"images": x})
    with pytest.raises(BadInputError, match=r"'image' is float64, the model expects float32"):
        model(x.astype(np.float64))
    with pytest.raises(BadInputError, match=r"shape \[1, 3, 4, 4\], the model expects"):
        model(x[:, :, :4, :4])
    with pytest.raises(BadInputError, match="both by position and by name"):
        model(x, image=x)
    with pytest.raises(BadInputError, match="2 positional inputs"):
        model(x, x)


def _at_offset(x: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``x`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.zeros(x.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    placed = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    placed[...] = x
    return placed


def test_outputs_survive_later_runs_whatever_the_input_alignment(built: Path) -> None:
    """Inputs are shared with TVM when aligned and staged in a reused buffer when not; outputs
    are views of the run's own tensors. Neither may leak into another run's results."""
    model = load_artifact(built, num_threads=1)
    rng = np.random.default_rng(1)
    session = ort.InferenceSession(tiny_model(0).SerializeToString())
    runs = []
    for offset in (0, 4, 0, 4):
        x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
        runs.append((x.copy(), model(_at_offset(x, offset))))
    for x, got in runs:
        expected = dict(zip(["scores", "boxes"], session.run(None, {"image": x}), strict=True))
        for name, value in got.items():
            np.testing.assert_allclose(
                value, expected[name], rtol=FP32_EXACT.rtol, atol=FP32_EXACT.atol
            )


def test_an_output_that_is_the_input_is_not_overwritten_by_the_next_run(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="same")],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
    )
    _build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "i")
    model = load_artifact(tmp_path / "i", num_threads=1)
    for offset in (0, 4):
        first = _at_offset(np.ones((2, 16), np.float32), offset)
        kept = model(first)["y"]
        model(_at_offset(np.zeros((2, 16), np.float32), offset))
        first[...] = 5.0
        np.testing.assert_array_equal(kept, np.ones((2, 16), np.float32))


def test_latency_is_measured_per_run(built: Path) -> None:
    model = load_artifact(built, num_threads=1)
    x = np.zeros((1, 3, 8, 8), np.float32)
    times = model.latency({"image": x}, repeat=3)
    assert len(times) == 3 and all(0 < t < 1 for t in times)


def test_missing_or_corrupt_manifest_says_rerun_compile(copy_of_built: Path) -> None:
    manifest_path = copy_of_built / "manifest.json"
    original = manifest_path.read_text()
    manifest_path.write_text(original[: len(original) // 2])
    with pytest.raises(BadInputError, match=r"manifest.json is unreadable.*re-run detc compile"):
        load_artifact(copy_of_built)
    manifest_path.write_text(json.dumps({**json.loads(original), "format_version": 2}))
    with pytest.raises(BadInputError, match="format_version 2"):
        load_artifact(copy_of_built)
    manifest_path.unlink()
    with pytest.raises(BadInputError, match=r"manifest.json is missing; re-run detc compile"):
        load_artifact(copy_of_built)
    with pytest.raises(BadInputError, match="does not exist"):
        load_artifact(copy_of_built.parent / "nowhere")


def test_missing_or_corrupt_library_and_params_are_named(copy_of_built: Path) -> None:
    library = copy_of_built / "model.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=r"model.so does not match its manifest"):
        load_artifact(copy_of_built)
    library.unlink()
    with pytest.raises(BadInputError, match=r"model.so is missing; re-run detc compile"):
        load_artifact(copy_of_built)


def test_missing_params_file_is_named(copy_of_built: Path) -> None:
    (copy_of_built / "params.npz").unlink()
    with pytest.raises(BadInputError, match=r"params.npz is missing; re-run detc compile"):
        load_artifact(copy_of_built)


def _rewrite_manifest(directory: Path, **changes: object) -> None:
    path = directory / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_an_aarch64_library_points_to_emulation_or_a_board(copy_of_built: Path) -> None:
    library = copy_of_built / "model.so"
    data = bytearray(library.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # ELF e_machine = EM_AARCH64
    library.write_bytes(bytes(data))
    _rewrite_manifest(copy_of_built, library_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(BadInputError, match=r"aarch64 library.*detc verify --emulate.*board"):
        load_artifact(copy_of_built)


def test_a_library_for_features_this_cpu_lacks_is_refused(copy_of_built: Path) -> None:
    host_flags = detect_host_cpu().flags
    foreign = [mcpu for mcpu in sorted(REQUIRED_FLAGS) if missing_flags(mcpu, host_flags)]
    if not foreign:
        pytest.skip("this CPU has every feature detc's CPU table knows")
    manifest = read_manifest(copy_of_built)
    manifest["target"]["tvm_target"]["mcpu"] = foreign[0]
    _rewrite_manifest(copy_of_built, target=manifest["target"])
    with pytest.raises(BadInputError, match=rf"built for {foreign[0]}.*--target x86"):
        load_artifact(copy_of_built)
