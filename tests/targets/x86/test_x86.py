"""The x86 target: CPU detection, target names, compiling ONNX models and matching onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.errors import BadInputError, UnsupportedModelError
from detc.compiler.tolerances import COMPILED_FP32, FP16, FP32_EXACT
from detc.targets import available_targets, build_artifact, load_artifact, resolve_target
from detc.targets.cpu import detect_host_cpu, feature_level, missing_flags, parse_cpuinfo
from detc.targets.precision import promote_float16_to_float32

V3_FLAGS = (
    "fpu sse sse2 pni ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm abm movbe xsave avx avx2 "
    "bmi1 bmi2 f16c fma"
)
V4_FLAGS = V3_FLAGS + " avx512f avx512bw avx512cd avx512dq avx512vl"


def _cpuinfo(
    vendor: str, family: int, model: int, flags: str, layout: list[tuple[int, int]]
) -> str:
    """A /proc/cpuinfo text with one block per (physical id, core id) in ``layout``."""
    blocks = []
    for processor, (package, core) in enumerate(layout):
        blocks.append(
            f"processor\t: {processor}\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
            f"model\t\t: {model}\nmodel name\t: test cpu\nphysical id\t: {package}\n"
            f"core id\t\t: {core}\nflags\t\t: {flags}\n"
        )
    return "\n".join(blocks)


# ---- CPU detection -------------------------------------------------------------------------


def test_zen3_epyc_is_znver3_with_physical_cores_not_hyperthreads() -> None:
    text = _cpuinfo(
        "AuthenticAMD", 25, 1, V3_FLAGS + " vaes vpclmulqdq", [(0, 0), (0, 1), (0, 0), (0, 1)]
    )
    cpu = parse_cpuinfo(text)
    assert cpu.mcpu == "znver3"
    assert (cpu.physical_cores, cpu.logical_cpus) == (2, 4)


def test_intel_models_and_flag_refinement() -> None:
    assert parse_cpuinfo(_cpuinfo("GenuineIntel", 6, 0x3F, V3_FLAGS, [(0, 0)])).mcpu == "haswell"
    skylake_sp = _cpuinfo("GenuineIntel", 6, 0x55, V4_FLAGS, [(0, 0)])
    assert parse_cpuinfo(skylake_sp).mcpu == "skylake-avx512"
    cascade = _cpuinfo("GenuineIntel", 6, 0x55, V4_FLAGS + " avx512_vnni", [(0, 0)])
    assert parse_cpuinfo(cascade).mcpu == "cascadelake"


def test_model_number_with_masked_features_falls_back_to_what_the_flags_support() -> None:
    # A hypervisor reporting Sapphire Rapids while hiding AVX-512/AMX: naming the model would
    # let LLVM emit instructions that fault.
    cpu = parse_cpuinfo(_cpuinfo("GenuineIntel", 6, 0x8F, V3_FLAGS, [(0, 0)]))
    assert cpu.mcpu == "x86-64-v3"
    assert "sapphirerapids" in cpu.mcpu_reason and "amx_tile" in cpu.mcpu_reason


def test_unknown_cpu_and_missing_cpuinfo_fall_back_safely() -> None:
    unknown = parse_cpuinfo(_cpuinfo("HygonGenuine", 24, 1, V4_FLAGS, [(0, 0), (0, 1)]))
    assert unknown.mcpu == "x86-64-v4"
    assert unknown.physical_cores == 2
    nothing = parse_cpuinfo("", usable_cpu_ids={0, 1, 2})
    assert nothing.mcpu == "x86-64"
    assert nothing.physical_cores == 3


def test_affinity_and_cgroup_limit_cap_the_core_count() -> None:
    text = _cpuinfo("AuthenticAMD", 25, 1, V3_FLAGS, [(0, c) for c in range(8)])
    assert parse_cpuinfo(text, usable_cpu_ids={0, 1, 2}).physical_cores == 3
    assert parse_cpuinfo(text, cpu_limit=2).physical_cores == 2


def test_feature_levels_and_missing_flags() -> None:
    assert feature_level(V4_FLAGS.split()) == "x86-64-v4"
    assert feature_level(V3_FLAGS.split()) == "x86-64-v3"
    assert feature_level(["sse", "sse2"]) == "x86-64"
    assert missing_flags("skylake-avx512", V3_FLAGS.split()) == sorted(
        {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    )
    assert missing_flags("haswell", V4_FLAGS.split()) == []


def test_this_host_gets_a_cpu_llvm_knows_and_can_run() -> None:
    from tvm.target import codegen

    host = detect_host_cpu()
    assert codegen.llvm_is_valid_cpu(host.mcpu, "x86_64-unknown-linux-gnu")
    assert missing_flags(host.mcpu, host.flags) == []
    assert 1 <= host.physical_cores <= host.logical_cpus


# ---- target names --------------------------------------------------------------------------


def test_target_names_resolve_and_bad_ones_are_refused_with_the_known_list() -> None:
    assert resolve_target("x86").mcpu == detect_host_cpu().mcpu
    assert resolve_target("x86:haswell").name == "x86:haswell"
    with pytest.raises(BadInputError, match=r"unknown target 'riscv'.*x86"):
        resolve_target("riscv")
    with pytest.raises(BadInputError, match="native"):
        resolve_target("x86:native")
    with pytest.raises(BadInputError, match="unknown x86 CPU 'pentium9000'"):
        resolve_target("x86:pentium9000")


def test_available_targets_describe_x86() -> None:
    infos = {info.name: info for info in available_targets()}
    assert "x86" in infos and "x86:<mcpu>" in infos
    assert f"mcpu={detect_host_cpu().mcpu}" in infos["x86"].enables


def test_importing_the_package_and_listing_targets_does_not_import_tvm() -> None:
    code = (
        "import sys, detc.targets as t; t.available_targets(); "
        "print('tvm' in sys.modules or 'tvm_ffi' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- tiny models ---------------------------------------------------------------------------


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def detector_ops_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv/Relu/Sigmoid/Add/MaxPool/Resize(nearest, linear)/Concat/Split, opset 17, 2 outputs."""
    inits = [
        _weight(rng, "w1", (8, 4, 3, 3)),
        _weight(rng, "b1", (8,)),
        _weight(rng, "w2", (4, 6, 1, 1)),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.array([6, 18], np.int64), "split"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["c1"], ["s"], name="sigmoid"),
        helper.make_node("Add", ["r", "s"], ["a"], name="add"),
        helper.make_node(
            "MaxPool", ["a"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Resize", ["mp", "", "scales"], ["up"], name="up_nearest", mode="nearest"),
        helper.make_node(
            "Resize",
            ["mp", "", "scales"],
            ["lin"],
            name="up_linear",
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Concat", ["up", "a", "lin"], ["cat"], name="concat", axis=1),
        helper.make_node("Split", ["cat", "split"], ["s1", "feats"], name="split", axis=1),
        helper.make_node("Conv", ["s1", "w2"], ["boxes"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "detector_ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 8, 8]),
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 18, 8, 8]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _float16_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with float16 weights and I/O (what a half-precision exporter writes;
    Resize's scales stay float32, as ONNX requires)."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for tensor in half.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and tensor.name != "scales":
            array = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in [*half.graph.input, *half.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(half, full_check=True)
    return half


def _onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Path]:
    model = detector_ops_model(np.random.default_rng(7))
    out_dir = tmp_path_factory.mktemp("tiny") / "artifact"
    build_artifact(model, "x86", out_dir, manifest_fields={}, num_threads=2, progress=False)
    return model, out_dir


def test_detector_ops_match_onnxruntime(tiny_artifact: tuple[onnx.ModelProto, Path]) -> None:
    model, out_dir = tiny_artifact
    compiled = load_artifact(out_dir, num_threads=2)
    assert compiled.output_names == ["boxes", "feats"]
    for seed in (0, 1):
        x = np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)
        expected = _onnxruntime(model, {"x": x})
        actual = compiled(x)
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            assert actual[name].dtype == value.dtype and actual[name].shape == value.shape
            np.testing.assert_allclose(
                actual[name], value, rtol=FP32_EXACT.rtol, atol=FP32_EXACT.atol, err_msg=name
            )


def test_named_cpu_target_builds_for_that_cpu(tmp_path: Path, rng: np.random.Generator) -> None:
    model = detector_ops_model(rng)
    manifest = build_artifact(
        model, "x86:haswell", tmp_path / "haswell", manifest_fields={}, progress=False
    )
    assert manifest["target"]["name"] == "x86:haswell"
    assert manifest["target"]["tvm_target"]["mcpu"] == "haswell"
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    actual = load_artifact(tmp_path / "haswell", num_threads=1).run({"x": x})
    expected = _onnxruntime(model, {"x": x})
    np.testing.assert_allclose(
        actual["boxes"], expected["boxes"], rtol=FP32_EXACT.rtol, atol=FP32_EXACT.atol
    )


def test_float16_promotion_keeps_half_io_and_computes_in_float() -> None:
    half = _float16_copy(detector_ops_model(np.random.default_rng(3)))
    promoted, changed = promote_float16_to_float32(half)
    assert changed
    assert [i.type.tensor_type.elem_type for i in promoted.graph.input] == [TensorProto.FLOAT16]
    assert {o.type.tensor_type.elem_type for o in promoted.graph.output} == {TensorProto.FLOAT16}
    assert {t.data_type for t in half.graph.initializer} == {
        TensorProto.FLOAT16,
        TensorProto.FLOAT,
        TensorProto.INT64,
    }
    assert {t.data_type for t in promoted.graph.initializer} == {
        TensorProto.FLOAT,
        TensorProto.INT64,
    }
    casts = [n for n in promoted.graph.node if n.op_type == "Cast"]
    assert [n.input[0] for n in casts] == ["x", "boxes__detc_fp32", "feats__detc_fp32"]
    float_model = detector_ops_model(np.random.default_rng(3))
    assert promote_float16_to_float32(float_model) == (float_model, False)
    onnx.checker.check_model(promoted, full_check=True)
    x = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float16)
    reference = _onnxruntime(half, {"x": x})
    rewritten = _onnxruntime(promoted, {"x": x})
    for name, value in reference.items():
        assert rewritten[name].dtype == np.float16
        np.testing.assert_allclose(rewritten[name], value, rtol=FP16.rtol, atol=FP16.atol)


def test_float16_model_compiles_and_matches_onnxruntime_fp16(tmp_path: Path) -> None:
    half = _float16_copy(detector_ops_model(np.random.default_rng(5)))
    manifest = build_artifact(half, "x86", tmp_path / "half", manifest_fields={}, progress=False)
    assert manifest["precision"] == {"compute": "float32", "float16_promoted": True}
    assert manifest["inputs"][0]["dtype"] == "float16"
    compiled = load_artifact(tmp_path / "half", num_threads=2)
    x = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float16)
    actual = compiled(x=x)
    for name, value in _onnxruntime(half, {"x": x}).items():
        assert actual[name].dtype == np.float16
        np.testing.assert_allclose(actual[name], value, rtol=FP16.rtol, atol=FP16.atol)


def test_unsupported_op_names_the_node_and_leaves_nothing(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Col2Im", ["r", "shape", "block"], ["y"], name="fold_patches"),
        ],
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([3, 3], np.int64), "shape"),
            numpy_helper.from_array(np.array([1, 1], np.int64), "block"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedModelError) as caught:
        build_artifact(model, "x86", tmp_path / "out", manifest_fields={}, progress=False)
    message = str(caught.value)
    assert "Col2Im" in message and "fold_patches" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_every_unsupported_node_is_listed_sorted_in_one_line(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Col2Im", ["x", "shape", "block"], ["a"], name="fold_b"),
            helper.make_node("Mystery", ["a"], ["b"], name="custom", domain="com.example"),
            helper.make_node("Col2Im", ["b", "shape", "block"], ["y"], name="fold_a"),
        ],
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([3, 3], np.int64), "shape"),
            numpy_helper.from_array(np.array([1, 1], np.int64), "block"),
        ],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    with pytest.raises(UnsupportedModelError) as caught:
        build_artifact(model, "x86", tmp_path / "out", manifest_fields={}, progress=False)
    message = str(caught.value)
    assert "3 nodes: Col2Im (ai.onnx) 'fold_a', Col2Im (ai.onnx) 'fold_b', " in message
    assert "Mystery (com.example) 'custom'" in message and "\n" not in message


def test_progress_and_the_default_schedule_notice_reach_the_callback(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETC_CACHE_DIR", str(tmp_path / "cache"))  # an empty tuning database
    quiet: list[str] = []
    manifest = build_artifact(
        detector_ops_model(rng),
        "x86",
        tmp_path / "q",
        manifest_fields={},
        progress=False,
        report=quiet.append,
    )
    assert len(quiet) == 1 and quiet[0].startswith("partly tuned build:")
    assert [p["name"] for p in manifest["build"]["phases"]] == [
        "import",
        "legalize",
        "tune",
        "build",
        "export",
    ]
    assert manifest["build"]["phases"][2]["summary"].endswith("0 trials (search not requested)")


def test_a_build_without_tuning_flags_uses_the_convolution_template(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --tune and no database: the blocked template's default tiles, never TVM's generic
    convolution (yolov5n ran ~57x slower than onnxruntime on it; ~1.1x on the template)."""
    monkeypatch.setenv("DETC_CACHE_DIR", str(tmp_path / "cache"))
    manifest = build_artifact(
        detector_ops_model(rng), "x86", tmp_path / "d", manifest_fields={}, progress=False
    )
    tuning = manifest["tuning"]
    assert tuning["layout"] == "blocked" and tuning["trials"] == 0
    assert tuning["functions_template_default"] >= 1
    assert manifest["calling_convention"] == "inputs"


def test_a_default_pipeline_that_fails_falls_back_to_the_plain_one(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocked template cannot express every convolution yet (the zoo found DFL heads,
    odd depthwise and ConvTranspose necks): the default build must still compile, and say so."""
    from detc.targets.x86.target import X86Target

    def unsupported_layout(self: X86Target, ctx: object) -> str:
        raise RuntimeError("Layouts must have the same size")

    monkeypatch.setattr(X86Target, "legalize_blocked", unsupported_layout)
    notices: list[str] = []
    model = detector_ops_model(rng)
    manifest = build_artifact(
        model, "x86", tmp_path / "fb", manifest_fields={}, progress=False, report=notices.append
    )
    assert any(
        "blocked pipeline failed on this model (legalize: Layouts must" in n for n in notices
    )
    assert manifest["calling_convention"] == "inputs+params"
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    actual = load_artifact(tmp_path / "fb")(x=x)
    for name, value in _onnxruntime(model, {"x": x}).items():
        np.testing.assert_allclose(
            actual[name], value, rtol=COMPILED_FP32.rtol, atol=COMPILED_FP32.atol
        )


def test_an_expand_shape_held_as_an_initializer_stays_a_constant(tmp_path: Path) -> None:
    """fold-constants leaves shapes as int64 initializers; imported as runtime parameters they
    made the shape of TopK → Unsqueeze → Expand dynamic (a zoo CenterFace head: a wrong output
    shape, or a failed build)."""
    graph = helper.make_graph(
        [
            helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", axis=1),
            helper.make_node("Unsqueeze", ["indices", "axes"], ["column"], name="unsqueeze"),
            helper.make_node("Expand", ["column", "shape"], ["y"], name="expand"),
        ],
        "expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 400])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 20, 14])],
        [
            numpy_helper.from_array(np.array([20], np.int64), "k"),
            numpy_helper.from_array(np.array([2], np.int64), "axes"),
            numpy_helper.from_array(np.array([1, 1, 14], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from detc.targets import TuningOptions

    # the plain pipeline (ARM's, and x86's fallback) passes initializers as parameters
    plain = TuningOptions(tune=False, layout="plain")
    build_artifact(model, "x86", tmp_path / "e", manifest_fields={}, progress=False, tuning=plain)
    x = np.random.default_rng(0).permutation(400).astype(np.float32).reshape(1, 400)
    y = load_artifact(tmp_path / "e")(x=x)["y"]
    np.testing.assert_array_equal(y, _onnxruntime(model, {"x": x})["y"])


# ---- threads -------------------------------------------------------------------------------

_THREAD_PROBE = r"""
import json, os, sys, time
import numpy as np, tvm
from tvm.script import tirx as T
from detc.targets import configure_threads

@T.prim_func
def busy(a: T.Buffer((64, 100000), "float32"), b: T.Buffer((64,), "float32")):
    for i in T.parallel(64):
        b[i] = T.float32(0)
        for k in range(100000):
            b[i] = b[i] + T.sqrt(a[i, k] * a[i, k] + T.float32(1))

def cpu_ticks():
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks

used = configure_threads(int(sys.argv[1]))
kernel = tvm.compile(busy, target=tvm.target.Target({"kind": "llvm"}))
a = tvm.runtime.tensor(np.random.default_rng(0).random((64, 100000)).astype("float32"))
b = tvm.runtime.tensor(np.zeros(64, "float32"))
kernel(a, b)
before = cpu_ticks()
for _ in range(40):
    kernel(a, b)
after = cpu_ticks()
spent = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
print(json.dumps({"used": used, "spent": spent}))
"""


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_thread_count_changes_how_many_threads_do_the_work(tmp_path: Path) -> None:
    probe = tmp_path / "thread_probe.py"  # TVMScript reads the kernel's source from a file
    probe.write_text(_THREAD_PROBE)
    busy_threads = {}
    for requested in (1, 2):
        done = subprocess.run(
            [sys.executable, str(probe), str(requested)],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["used"] == requested
        top = report["spent"][0]
        assert top >= 10, f"the probe ran too briefly to judge: {report}"
        # threads sharing the work spend about as much as the busiest; an idle pool worker
        # that spins while the machine is loaded reached 40 % of it (never half)
        busy_threads[requested] = sum(ticks >= 0.5 * top for ticks in report["spent"])
    assert busy_threads == {1: 1, 2: 2}


# ---- the real detector (../shared) ---------------------------------------------------------


def _coco_image(shared_dir: Path, dtype: type) -> np.ndarray:
    from PIL import Image

    path = sorted((shared_dir / "data" / "coco64" / "images").glob("*.jpg"))[0]
    image = Image.open(path).convert("RGB").resize((640, 640))
    return (np.asarray(image, np.float32) / 255).transpose(2, 0, 1)[None].astype(dtype)


def _compile_and_compare(
    model_path: Path, tmp_path: Path, inputs: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    model = onnx.load(str(model_path))
    start = time.perf_counter()
    manifest = build_artifact(model, "x86", tmp_path / "yolo", manifest_fields={}, progress=False)
    print(f"{model_path.name}: compiled in {time.perf_counter() - start:.1f} s")
    assert manifest["tuning"]["tuned"] is False and manifest["tuning"]["untuned_tasks"] > 0
    compiled = load_artifact(tmp_path / "yolo", num_threads=2)
    return [(compiled(x)["output0"], _onnxruntime(model, {"images": x})["output0"]) for x in inputs]


@pytest.mark.shared
def test_yolov5n_matches_onnxruntime(yolov5n_path: Path, shared_dir: Path, tmp_path: Path) -> None:
    random_input = np.random.default_rng(0).random((1, 3, 640, 640)).astype(np.float32)
    pairs = _compile_and_compare(
        yolov5n_path, tmp_path, [random_input, _coco_image(shared_dir, np.float32)]
    )
    for actual, expected in pairs:
        assert actual.shape == (1, 25200, 85) and actual.dtype == np.float32
        # Scores (objectness, classes) are in [0, 1]; box columns are pixels up to ~650, where
        # fp32 summation order alone moves results by ~1e-3 (onnxruntime is itself ~1e-3 from a
        # float64 run), so they are held to the verify tolerance, relative.
        np.testing.assert_allclose(actual[..., 4:], expected[..., 4:], rtol=0, atol=1e-4)
        assert COMPILED_FP32.allclose(actual, expected)


@pytest.mark.shared
def test_yolov5n_fp16_matches_onnxruntime_fp16(shared_dir: Path, tmp_path: Path) -> None:
    path = shared_dir / "models" / "yolov5n_fp16.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    ((actual, expected),) = _compile_and_compare(
        path, tmp_path, [_coco_image(shared_dir, np.float16)]
    )
    assert actual.dtype == np.float16
    np.testing.assert_allclose(
        actual.astype(np.float32), expected.astype(np.float32), rtol=FP16.rtol, atol=FP16.atol
    )
