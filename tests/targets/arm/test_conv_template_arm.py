"""``--target arm`` fp32 builds by default with the blocked NEON convolution template.

Each build goes through ``build_artifact`` exactly as ``detc compile --target arm`` does. Checked
without a board: which schedule every convolution kernel got (the manifest's
``tuning.conv_kernels``, which the compile output prints), numerics under qemu against
onnxruntime, and the static instruction mix of the library (``fmla .4s`` in every template
kernel). Nothing here measures time: emulated runs say nothing about it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.tolerances import FP32_EXACT
from detc.targets.arm import instruction_mix
from detc.targets.artifact import build_artifact
from detc.targets.remote import emulator as _emulator
from detc.targets.remote import toolchain as _toolchain
from tests.targets.arm.test_arm import have_cross_compiler

needs_cross = pytest.mark.skipif(
    not have_cross_compiler(), reason="no aarch64 cross compiler (gcc-aarch64-linux-gnu)"
)
needs_emulation = pytest.mark.skipif(
    not have_cross_compiler() or _toolchain.find_qemu_aarch64() is None,
    reason="no aarch64 cross compiler (gcc-aarch64-linux-gnu) or qemu-aarch64 (qemu-user)",
)
needs_objdump = pytest.mark.skipif(
    instruction_mix.find_objdump() is None, reason="no aarch64-linux-gnu-objdump (binutils)"
)


def _conv(
    rng: np.random.Generator,
    nodes: list[onnx.NodeProto],
    weights: list[onnx.TensorProto],
    name: str,
    source: str,
    channels: tuple[int, int],
    kernel: int,
    stride: int = 1,
    group: int = 1,
    silu: bool = True,
) -> str:
    in_channels, out_channels = channels
    shape = (out_channels, in_channels // group, kernel, kernel)
    weight = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    bias = rng.standard_normal(out_channels) * 0.1
    weights += [
        numpy_helper.from_array(weight.astype(np.float32), f"{name}.w"),
        numpy_helper.from_array(bias.astype(np.float32), f"{name}.b"),
    ]
    nodes.append(
        helper.make_node(
            "Conv",
            [source, f"{name}.w", f"{name}.b"],
            [name],
            pads=[kernel // 2] * 4,
            strides=[stride, stride],
            group=group,
            name=name,
        )
    )
    if not silu:
        return name
    nodes.append(helper.make_node("Sigmoid", [name], [f"{name}.sig"], name=f"{name}.sigmoid"))
    nodes.append(
        helper.make_node("Mul", [name, f"{name}.sig"], [f"{name}.out"], name=f"{name}.mul")
    )
    return f"{name}.out"


def yolo_like_model(rng: np.random.Generator, *, depthwise: bool = False) -> onnx.ModelProto:
    """RGB stem (3 input channels), strided 3×3, 1×1 with a residual add, and a head whose 18
    output channels are not whole blocks: the conv kinds of a YOLO detector, at 32×32.
    ``depthwise`` adds a depthwise 3×3 (a grouped conv the template does not cover)."""
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    x = _conv(rng, nodes, weights, "stem", "images", (3, 16), 3, stride=2)
    x = _conv(rng, nodes, weights, "down", x, (16, 32), 3, stride=2)
    if depthwise:
        x = _conv(rng, nodes, weights, "dw", x, (32, 32), 3, group=32)
    y = _conv(rng, nodes, weights, "pointwise", x, (32, 32), 1)
    nodes.append(helper.make_node("Add", [x, y], ["residual"], name="residual"))
    out = _conv(rng, nodes, weights, "head", "residual", (32, 18), 1, silu=False)
    graph = helper.make_graph(
        nodes,
        "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 18, 8, 8])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build(model: onnx.ModelProto, out_dir: Path, target: str = "arm") -> tuple[dict, list[str]]:
    """The artifact as ``detc compile --target <target>`` writes it, and every line it printed."""
    lines: list[str] = []
    manifest = build_artifact(model, target, out_dir, manifest_fields={}, report=lines.append)
    return manifest, lines


def schedules(manifest: dict[str, Any]) -> dict[str, str]:
    return {k["name"]: k["schedule"] for k in manifest["tuning"]["conv_kernels"]}


def emulate_against_onnxruntime(
    model: onnx.ModelProto, artifact: Path, rng: np.random.Generator
) -> None:
    feeds = [{"images": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed, result in zip(feeds, _emulator.run_emulated_batch(artifact, feeds), strict=True):
        (expected,) = session.run(None, feed)
        (actual,) = result.values()
        np.testing.assert_allclose(actual, expected, rtol=FP32_EXACT.rtol, atol=FP32_EXACT.atol)


@needs_emulation
def test_every_conv_uses_the_template_and_matches_onnxruntime_under_emulation(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    model = yolo_like_model(rng)
    manifest, lines = build(model, tmp_path / "artifact")
    kernels = schedules(manifest)
    assert len(kernels) == 4
    assert set(kernels.values()) == {"template"}, kernels
    assert manifest["calling_convention"] == "inputs"
    assert "NCHW4c" in " ".join(p["summary"] for p in manifest["build"]["phases"])
    # the compile output names each kernel's schedule and tiles
    for name in kernels:
        assert any(line.startswith(f"conv kernel {name}: template (") for line in lines), name
    assert "convolutions: 4 of 4 kernels (4 calls) use the NEON blocked template" in lines
    # no search runs here, and none could: candidates must run on a board
    assert any(
        "search for them on a board (aarch64) with --tune --rpc-tracker" in line for line in lines
    )
    emulate_against_onnxruntime(model, tmp_path / "artifact", rng)


@needs_cross
@needs_objdump
def test_instruction_mix_finds_fmla_in_every_template_kernel(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    manifest, lines = build(yolo_like_model(rng), tmp_path / "artifact")
    functions = instruction_mix.disassemble(tmp_path / "artifact" / "model.so")
    mixes = instruction_mix.kernel_mixes(functions, manifest["tuning"]["conv_kernels"])
    assert len(mixes) == 4
    for mix in mixes:
        assert mix.whole.vector > 0, mix.describe()
        # every multiply-add of the micro-kernel is a lane of an fmla
        assert mix.main_loop.scalar == 0 and mix.main_loop.vector > 0, mix.describe()
        assert mix.main_loop.vector_fmas_per_mac == pytest.approx(0.25)
    assert instruction_mix.model_vector_fmas_per_mac(mixes) == pytest.approx(0.25)
    assert any(line.startswith("instruction mix (static") for line in lines)
    # the report a user runs on the artifact says the same
    report = instruction_mix.report(tmp_path / "artifact")
    assert report[0].startswith("instruction mix (static, from the disassembly; not a latency)")
    assert "4 of 4 conv kernels hold vector FMAs" in report[0]
    assert len(report) == 1 + len(mixes)


@needs_emulation
def test_a_depthwise_conv_is_reported_generic_and_still_matches(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    model = yolo_like_model(rng, depthwise=True)
    manifest, lines = build(model, tmp_path / "artifact")
    kernels = schedules(manifest)
    generic = [name for name, schedule in kernels.items() if schedule == "generic"]
    assert len(generic) == 1 and len(kernels) == 5, kernels
    assert any("1 of 5 convolution kernels use TVM's generic schedule" in line for line in lines)
    assert any(line.startswith("convolutions: 4 of 5 kernels") for line in lines)
    emulate_against_onnxruntime(model, tmp_path / "artifact", rng)


@needs_cross
def test_a_model_the_blocked_layout_cannot_build_falls_back_and_says_so(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detc.targets.arm.target import ArmTarget

    def cannot_express(self: ArmTarget, ctx: Any) -> str:
        raise ValueError("no blocked form for this convolution")

    monkeypatch.setattr(ArmTarget, "legalize_blocked", cannot_express)
    manifest, lines = build(yolo_like_model(rng), tmp_path / "artifact")
    assert any(
        "the blocked pipeline failed on this model (legalize: no blocked form" in line
        for line in lines
    )
    assert set(schedules(manifest).values()) == {"generic"}
    assert manifest["calling_convention"] == "inputs+params"


@needs_cross
def test_database_records_replace_the_default_tiles(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """A record for the preset (as a board farm's ``detc tune --export-db`` carries it) is
    applied in place of the default tiles, without any search."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from detc.kernels.conv2d_nchwc import schedule_conv2d_nchwc
    from detc.targets import resolve_target
    from detc.targets.context import BuildContext
    from detc.targets.target import run_phases
    from detc.targets.tuning.database import TuningDatabase
    from detc.targets.tuning.options import TuningOptions
    from detc.targets.tuning.tasks import extract_tasks

    model = yolo_like_model(rng)
    arm = resolve_target("arm:cortex-a76")
    context = BuildContext(
        model=model,
        staging_dir=tmp_path,
        num_threads=4,
        progress=lambda _: None,
        warn=lambda _: None,
        pipeline=arm.pipeline_for(None),
    )
    run_phases(arm, context, only=("import", "legalize"))
    target = tvm.target.Target(arm.tvm_target_json(4))
    tuned = next(t for t in extract_tasks(context.mod) if t.templated)
    sch = tvm.s_tir.Schedule(tuned.workload)
    tiles = {"oc_tile": 1, "oh_tile": 1, "ow_tile": 2}
    schedule_conv2d_nchwc(sch, rows_outside=True, inline_pad=True, tiles=tiles)
    workload = ms.database.Workload(tuned.workload)
    args = ms.arg_info.ArgInfo.from_prim_func(tuned.workload["main"])
    record = ms.database.TuningRecord(sch.trace, workload, [1e-4], target, args)
    database = TuningDatabase(tmp_path / "db", json.loads(str(target)))
    database.add(tuned.workload_json, [(record.as_json(), 1e-4)], tuned.workload)

    built = build_artifact(
        model,
        "arm:cortex-a76",
        tmp_path / "artifact",
        manifest_fields={},
        report=lambda _: None,
        tuning=TuningOptions(tune=False, database=tmp_path / "db"),
    )
    assert built["tuning"]["functions_from_database"] == len(tuned.gvars)
    (from_database,) = [k for k in built["tuning"]["conv_kernels"] if k["name"] == tuned.name]
    assert from_database["schedule"] == "template"
    assert from_database["tiles"]["ow_tile"] == 2 and from_database["tiles"]["inline_pad"] == 1


@pytest.mark.slow
@needs_emulation
def test_yolov5n_uses_the_template_for_every_conv_and_verifies_under_emulation(
    tmp_path: Path, yolov5n_path: Path
) -> None:
    model = onnx.load(str(yolov5n_path))
    manifest, lines = build(model, tmp_path / "yolov5n")
    kernels = schedules(manifest)
    assert kernels and set(kernels.values()) == {"template"}, kernels
    mix = next(line for line in lines if line.startswith("instruction mix (static"))
    assert f"{len(kernels)} of {len(kernels)} conv kernels hold vector FMAs" in mix
    feeds = {"images": np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)}
    (result,) = _emulator.run_emulated_batch(tmp_path / "yolov5n", [feeds])
    session = ort.InferenceSession(str(yolov5n_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]
    actual = next(iter(result.values()))
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3)
