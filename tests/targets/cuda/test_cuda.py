"""The CUDA target: presets, fatbin embedding, precision, and a GPU-less machine refusing to run.

Builds need nvcc (skipped without it) but no GPU; running on a GPU is marked ``gpu``.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.errors import BadInputError
from detc.compiler.tolerances import COMPILED_FP32, FP16
from detc.targets import available_targets, build_artifact, load_artifact, resolve_target
from detc.targets.cuda import CUDA_PRESETS, find_nvcc, library_fatbin_entries, local_gpu
from detc.targets.cuda.fatbin import FATBIN_MAGIC, fatbin_entries, replace_cuda_code
from detc.targets.cuda.identifiers import with_c_identifiers
from detc.targets.cuda.target import INT8_NOTICE
from detc.targets.remote.toolchain import find_aarch64_cross_compiler

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")
SHAPE = (1, 3, 16, 16)


def _conv_model(rng: np.random.Generator, dtype: type = np.float32) -> onnx.ModelProto:
    """Conv → Sigmoid·x (SiLU) → Conv, with names nvcc would refuse as C identifiers."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = {
        "/stem/conv/weight": rng.normal(0, 0.3, (8, 3, 3, 3)),
        "/stem/conv/bias": rng.normal(0, 0.3, 8),
        "head.weight": rng.normal(0, 0.3, (4, 8, 1, 1)),
    }
    nodes = [
        helper.make_node(
            "Conv", ["input.1", "/stem/conv/weight", "/stem/conv/bias"], ["c"], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["a"]),
        helper.make_node("Conv", ["a", "head.weight"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cuda-test",
        [helper.make_tensor_value_info("input.1", elem, list(SHAPE))],
        [helper.make_tensor_value_info("output0", elem, [1, 4, 16, 16])],
        [numpy_helper.from_array(w.astype(dtype), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def _qdq_model(rng: np.random.Generator) -> onnx.ModelProto:
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    weight = numpy_helper.from_array(rng.integers(-60, 60, (4, 3, 3, 3)).astype(np.int8), "w_q")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [scale, zero, weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _build(model: onnx.ModelProto, target: str, out: Path, **options: object) -> tuple[dict, list]:
    notices: list[str] = []
    manifest = build_artifact(
        model, target, out, manifest_fields={}, report=notices.append, **options
    )
    return manifest, notices


# ---- no TVM, no nvcc -------------------------------------------------------------------------


def test_targets_lists_every_preset_with_what_it_enables() -> None:
    listed = {info.name: info for info in available_targets()}
    for name in (
        "cuda",
        "cuda:sm_75",
        "cuda:sm_80",
        "cuda:sm_86",
        "cuda:sm_87",
        "cuda:sm_89",
        "cuda:sm_90",
    ):
        assert name in listed, name
    assert "tensor cores" in listed["cuda:sm_75"].enables
    assert "dp4a" in listed["cuda:sm_80"].enables
    assert "aarch64" in listed["cuda:sm_87"].enables
    assert "Orin" in listed["cuda:sm_87"].description


def test_an_unknown_architecture_names_the_presets() -> None:
    with pytest.raises(BadInputError, match="cuda:sm_90"):
        resolve_target("cuda:sm_61")


def test_the_jetson_preset_builds_aarch64_host_code() -> None:
    target = resolve_target("cuda:sm_87")
    assert target.machine == "aarch64"
    assert target.tvm_target_json(1)["host"]["mtriple"] == "aarch64-linux-gnu"
    assert target.tvm_target_json(1)["arch"] == "sm_87"


def test_precision_fp16_is_refused_by_a_cpu_target(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    with pytest.raises(BadInputError, match="offers precision fp32, not fp16"):
        build_artifact(
            _conv_model(rng), "x86", tmp_path / "a", manifest_fields={}, precision="fp16"
        )
    assert not (tmp_path / "a").exists()


def test_names_become_c_identifiers_outputs_kept(rng: np.random.Generator) -> None:
    model = _conv_model(rng)
    renamed = with_c_identifiers(model)
    names = [v.name for v in renamed.graph.input] + [i.name for i in renamed.graph.initializer]
    assert all(name.isidentifier() for name in names), names
    assert [o.name for o in renamed.graph.output] == ["output0"]
    assert renamed.graph.node[0].input[0] == renamed.graph.input[0].name
    assert model.graph.input[0].name == "input.1"  # the caller's model is untouched
    assert with_c_identifiers(renamed) is renamed


def _string(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def _packed(cuda_payload: bytes) -> bytes:
    """A packed tree as export_library embeds it: VM executable → host library → cuda."""
    tree = (
        struct.pack("<Q", 4)
        + struct.pack("<4Q", 0, 1, 2, 2)
        + struct.pack("<Q", 2)
        + struct.pack("<2Q", 1, 2)
        + _string(b"relax.VMExecutable")
        + _string(b"vm bytes")
        + _string(b"_lib")
        + _string(b"cuda")
        + _string(cuda_payload)
    )
    return struct.pack("<Q", len(tree)) + tree


def test_the_cuda_source_is_replaced_by_the_fatbin_and_the_function_map_kept() -> None:
    source = 'extern "C" __global__ void k(float* a) {}'
    function_map = b"\x01\x00\x00\x00\x00\x00\x00\x00FMAP"
    packed = _packed(_string(b"cuda") + function_map + _string(source.encode()))
    fatbin = struct.pack("<I", FATBIN_MAGIC) + b"binary"
    replaced = replace_cuda_code(packed, source, fatbin)
    expected_payload = _string(b"fatbin") + function_map + _string(fatbin)
    assert replaced.endswith(_string(b"cuda") + _string(expected_payload))
    assert replaced.startswith(struct.pack("<Q", len(replaced) - 8))
    assert b"vm bytes" in replaced
    with pytest.raises(ValueError, match="no CUDA module"):
        replace_cuda_code(packed, "other source", fatbin)


def _fatbin(entries: list[tuple[int, int]]) -> bytes:
    body = b""
    for kind, arch in entries:
        header = struct.pack("<HHIQ", kind, 1, 64, 8) + bytes(8) + struct.pack("<I", 0)
        header += struct.pack("<I", arch) + bytes(64 - 32)
        body += header + b"payload!"
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def test_fatbin_entries_name_kind_and_architecture() -> None:
    data = b"ELF junk" + _fatbin([(2, 90), (1, 90)]) + b"more"
    assert [(e.kind, e.arch) for e in fatbin_entries(data)] == [("sass", "sm_90"), ("ptx", "sm_90")]
    assert fatbin_entries(b"no fatbin here") == []


# ---- builds (nvcc, no GPU) -------------------------------------------------------------------


def _buildable(name: str) -> bool:
    if CUDA_PRESETS[name].host_machine != "aarch64":
        return True
    try:
        find_aarch64_cross_compiler()
    except BadInputError:
        return False
    return True


@needs_nvcc
@pytest.mark.parametrize("preset", list(CUDA_PRESETS))
def test_each_preset_builds_a_library_with_its_sass(
    preset: str, tmp_path: Path, rng: np.random.Generator
) -> None:
    if not _buildable(preset):
        pytest.skip(f"{preset} links aarch64 host code: no aarch64 cross compiler")
    started = time.perf_counter()
    manifest, notices = _build(_conv_model(rng), preset, tmp_path / "a")
    seconds = time.perf_counter() - started
    entries = library_fatbin_entries(tmp_path / "a" / "model.so")
    sass = {e.arch for e in entries if e.kind == "sass"}
    assert sass == set(CUDA_PRESETS[preset].sass), entries
    assert {e.arch for e in entries if e.kind == "ptx"} == {CUDA_PRESETS[preset].arch}
    assert manifest["target"]["name"] == preset
    assert manifest["target"]["tvm_target"]["arch"] == CUDA_PRESETS[preset].arch
    assert manifest["target"]["tvm_target"]["kind"] == "cuda"
    assert manifest["tuning"]["schedules"] == "dlight"
    assert sum(manifest["tuning"]["dlight_rules"].values()) >= 2
    assert any("dlight's default GPU schedules" in line for line in notices), notices
    assert seconds < 120


@needs_nvcc
def test_a_cuda_artifact_without_a_gpu_fails_with_one_line(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    if local_gpu() is not None:
        pytest.skip("this machine has a GPU")
    _build(_conv_model(rng), "cuda:sm_80", tmp_path / "a")
    with pytest.raises(BadInputError) as raised:
        load_artifact(tmp_path / "a")
    message = str(raised.value)
    assert "\n" not in message
    assert "NVIDIA GPU" in message and "cuda:sm_80" in message


@needs_nvcc
def test_precision_fp16_computes_in_half_with_float_accumulation(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    manifest, _ = _build(_conv_model(rng), "cuda:sm_86", tmp_path / "a", precision="fp16")
    assert manifest["precision"]["compute"] == "float16"
    assert manifest["precision"]["accumulate"] == "float32"
    assert manifest["inputs"][0]["dtype"] == "float32"  # I/O stays as the model's
    with np.load(tmp_path / "a" / "params.npz") as params:
        assert {params[key].dtype for key in params.files} == {np.dtype(np.float16)}


@needs_nvcc
def test_a_float16_model_runs_in_float16(tmp_path: Path, rng: np.random.Generator) -> None:
    manifest, _ = _build(_conv_model(rng, np.float16), "cuda:sm_75", tmp_path / "a")
    assert manifest["precision"]["compute"] == "float16"
    assert manifest["precision"]["requested"] == "as-model"
    assert manifest["inputs"][0]["dtype"] == "float16"


@needs_nvcc
def test_int8_says_it_runs_as_float(tmp_path: Path, rng: np.random.Generator) -> None:
    manifest, notices = _build(_qdq_model(rng), "cuda:sm_89", tmp_path / "a")
    assert INT8_NOTICE in notices
    assert "floating point" in manifest["precision"]["int8"]


def test_the_mixed_precision_rewrite_matches_fp32_within_fp16_tolerance(
    rng: np.random.Generator,
) -> None:
    """The fp16 rewrite the CUDA target applies, run on the CPU (no GPU here): the same Relax
    graph against onnxruntime's fp32 run."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from detc.targets.cuda.mixed_precision import to_mixed_precision

    model = with_c_identifiers(_conv_model(rng))
    mod, params = relax.frontend.detach_params(from_onnx(model, keep_params_in_input=True))
    weights = [p.numpy() for p in params["main"]]
    mod, weights, halved = to_mixed_precision(mod, weights, 1)
    assert halved == 3
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = rng.normal(0, 1, SHAPE).astype(np.float32)
    actual = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(w) for w in weights]).numpy()
    session = ort.InferenceSession(_conv_model(np.random.default_rng(0)).SerializeToString())
    (expected,) = session.run(None, {"input.1": x})
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=FP16.rtol, atol=FP16.atol)


# ---- acceptance on the real model (../shared) and on a GPU --------------------------------


@needs_nvcc
@pytest.mark.shared
def test_yolov5n_builds_for_sm_90(yolov5n_path: Path, tmp_path: Path) -> None:
    _, notices = _build(onnx.load(yolov5n_path), "cuda:sm_90", tmp_path / "y5")
    entries = library_fatbin_entries(tmp_path / "y5" / "model.so")
    assert "sm_90" in {e.arch for e in entries if e.kind == "sass"}
    assert any("dlight" in line for line in notices)


@needs_nvcc
@pytest.mark.gpu
def test_runs_on_the_gpu_and_matches_onnxruntime(tmp_path: Path, rng: np.random.Generator) -> None:
    gpu = local_gpu()
    if gpu is None:
        pytest.skip("no CUDA GPU on this machine")
    model = _conv_model(rng)
    _build(model, "cuda", tmp_path / "a")
    _build(model, "cuda", tmp_path / "h", precision="fp16")
    x = rng.normal(0, 1, SHAPE).astype(np.float32)
    (expected,) = ort.InferenceSession(model.SerializeToString()).run(None, {"input.1": x})
    fp32 = load_artifact(tmp_path / "a")(x)["output0"]
    fp16 = load_artifact(tmp_path / "h")(x)["output0"]
    np.testing.assert_allclose(fp32, expected, rtol=COMPILED_FP32.rtol, atol=COMPILED_FP32.atol)
    np.testing.assert_allclose(fp16, expected, rtol=FP16.rtol, atol=FP16.atol)
