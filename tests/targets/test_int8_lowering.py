"""Real int8 execution of QDQ convolutions (targets/_int8.py, kernels/conv2d_int8.py).

Fixtures are one-convolution float models built in code and quantized the way users quantize
them: ``onnxruntime.quantization.quantize_static`` in QDQ format (activations uint8 per tensor,
asymmetric; weights int8 per channel, symmetric; bias int32). The last DequantizeLinear is
dropped so the graph output is the quantized tensor itself: the comparison is on integers.
The reference is onnxruntime with graph optimizations on, which fuses DQ → Conv → Q into its
integer QLinearConv (checked in ``test_reference_is_onnxruntimes_integer_qlinearconv``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from onnxruntime import quantization
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from detc.compiler.reference import ort_session, run_session
from detc.kernels.conv2d_int8 import assembly_of
from detc.targets import resolve_target
from detc.targets.cpu import REQUIRED_FLAGS, detect_host_cpu, missing_flags
from detc.targets.int8 import (
    bind_quantization_params,
    explain_int8_lowering,
    lower_qdq_conv2d_to_int8,
)

#: a CPU with AVX512-VNNI, one with AVX-VNNI only, and ones without VNNI (AVX-512 / AVX2)
VNNI_CPUS = ("sapphirerapids", "alderlake")
NO_VNNI_CPUS = ("skylake-avx512", "haswell")


# ---- fixtures ----------------------------------------------------------------------------------


def float_conv_model(
    rng: np.random.Generator,
    *,
    in_channels: int = 8,
    out_channels: int = 16,
    size: int = 9,
    kernel: int = 3,
    stride: int = 1,
    pads: tuple[int, int, int, int] = (1, 1, 1, 1),
    bias: bool = True,
    relu: bool = False,
) -> onnx.ModelProto:
    """x [1, C, size, size] → Conv 'conv' (→ Relu 'relu') → y."""
    weight = rng.normal(0.0, 0.3, (out_channels, in_channels, kernel, kernel)).astype(np.float32)
    initializers = [numpy_helper.from_array(weight, "W")]
    inputs = ["x", "W"]
    if bias:
        bias_values = rng.normal(0.0, 0.5, out_channels).astype(np.float32)
        initializers.append(numpy_helper.from_array(bias_values, "B"))
        inputs.append("B")
    conv_out = "c" if relu else "y"
    out_h = (size + pads[0] + pads[2] - kernel) // stride + 1
    out_w = (size + pads[1] + pads[3] - kernel) // stride + 1
    nodes = [
        helper.make_node(
            "Conv",
            inputs,
            [conv_out],
            name="conv",
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=list(pads),
        )
    ]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, out_h, out_w])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def input_batch(rng: np.random.Generator, model: onnx.ModelProto) -> np.ndarray:
    """Image-like values offset below zero, so the input zero point is not 0."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return (rng.random(dims, dtype=np.float32) * 2.0 - 0.5).astype(np.float32)


class _Calibration(quantization.CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"x": batch}


def quantize_qdq(
    model: onnx.ModelProto,
    rng: np.random.Generator,
    workdir: Path,
    *,
    activations: str = "uint8",
    keep_output_dequantize: bool = False,
) -> onnx.ModelProto:
    """``quantize_static`` (QDQ, per-channel int8 weights) of ``model``, calibrated on seeded
    batches; without ``keep_output_dequantize`` the graph output is the quantized tensor."""
    source, quantized = workdir / "float.onnx", workdir / "qdq.onnx"
    onnx.save(model, source)
    batches = [input_batch(rng, model) for _ in range(3)]
    activation_type = {"uint8": quantization.QuantType.QUInt8, "int8": quantization.QuantType.QInt8}
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice
    quantization.quantize_static(
        str(source),
        str(quantized),
        _Calibration(batches),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=activation_type[activations],
        weight_type=quantization.QuantType.QInt8,
    )
    qdq = onnx.load(str(quantized))
    if keep_output_dequantize:
        return qdq
    last = qdq.graph.node[-1]
    assert last.op_type == "DequantizeLinear" and last.output[0] == "y"
    del qdq.graph.node[-1]
    elem_type = TensorProto.UINT8 if activations == "uint8" else TensorProto.INT8
    dims = [d.dim_value for d in qdq.graph.output[0].type.tensor_type.shape.dim]
    del qdq.graph.output[:]
    qdq.graph.output.append(helper.make_tensor_value_info(last.input[0], elem_type, dims))
    return qdq


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def import_bound(model: onnx.ModelProto) -> tuple[tvm.IRModule, list[np.ndarray]]:
    """TVM's import as the target's import phase does it, then the quantization constants bound."""
    mod = from_onnx(model, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    arrays = [p.numpy() for p in params.get("main", [])]
    return bind_quantization_params(mod, arrays, int(mod["main"].attrs["num_input"]))


def x86_target(mcpu: str | None = None) -> tvm.target.Target:
    """The x86 target's TVM target (``x86`` = this host, else ``x86:<mcpu>``)."""
    target = resolve_target("x86" if mcpu is None else f"x86:{mcpu}")
    return tvm.target.Target(target.tvm_target_json(1))


def lower(mod: tvm.IRModule, target: tvm.target.Target, **options: bool) -> tvm.IRModule:
    with target:
        return lower_qdq_conv2d_to_int8(**options)(mod)


def compile_int8(
    model: onnx.ModelProto, mcpu: str | None = None, **options: bool
) -> tuple[relax.VirtualMachine, tvm.IRModule, str]:
    """import → bind → int8 lowering → the x86 target's legalize passes → build; returns the VM,
    the legalized module and the assembly."""
    target = x86_target(mcpu)
    mod, remaining = import_bound(model)
    assert remaining == []
    passes = [lower_qdq_conv2d_to_int8(**options), *resolve_target("x86").legalize_passes()]
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    executable = tvm.compile(mod, target=target)
    return relax.VirtualMachine(executable, tvm.cpu()), mod, assembly_of(executable)


def run_tvm(vm: relax.VirtualMachine, x: np.ndarray) -> np.ndarray:
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def run_onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    (result,) = run_session(ort_session(model, threads=1), {"x": x}).values()
    return result


def relax_ops(mod: tvm.IRModule) -> list[str]:
    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            op = getattr(binding.value, "op", None)
            names.append(str(getattr(op, "name", getattr(op, "name_hint", ""))))
    return names


def host_runs(mcpu: str) -> bool:
    return not missing_flags(mcpu, detect_host_cpu().flags)


# ---- numerics against onnxruntime ----------------------------------------------------------------

CASES: dict[str, dict[str, Any]] = {
    "1x1": {"kernel": 1, "pads": (0, 0, 0, 0)},
    "3x3-stride1-pad1": {"kernel": 3, "pads": (1, 1, 1, 1)},
    "3x3-stride2-pad1": {"kernel": 3, "stride": 2, "pads": (1, 1, 1, 1), "size": 11},
    "3x3-stride2-asymmetric-pad": {"kernel": 3, "stride": 2, "pads": (0, 1, 1, 0)},
    "3x3-no-bias-odd-channels": {
        "kernel": 3,
        "bias": False,
        "in_channels": 3,
        "out_channels": 20,
    },
    # With VNNI the default schedule is the pixel layout here: the 1x1 runs on the image as
    # one row of 64 pixels (memory.view around the kernel), the 3x3 on rows of 32.
    "1x1-pixel-layout": {"kernel": 1, "pads": (0, 0, 0, 0), "size": 8},
    "3x3-pixel-layout": {"kernel": 3, "pads": (1, 1, 1, 1), "size": 32},
}


@pytest.mark.parametrize("case", list(CASES))
def test_int8_conv_is_bit_exact_with_onnxruntime(case: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(sorted(CASES).index(case))
    model = quantize_qdq(float_conv_model(rng, **CASES[case]), rng, tmp_path)
    assert initializer(model, "x_zero_point") != 0 and initializer(model, "y_zero_point") != 0
    x = input_batch(rng, model)
    vm, mod, _ = compile_int8(model)
    got, expected = run_tvm(vm, x), run_onnxruntime(model, x)
    assert got.dtype == expected.dtype == np.uint8
    assert np.unique(expected).size > 16  # a near-constant output would prove little
    np.testing.assert_array_equal(got, expected)
    assert "relax.nn.conv2d" not in relax_ops(mod)


def test_int8_activations_are_bit_exact_with_onnxruntime(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    model = quantize_qdq(float_conv_model(rng, stride=2), rng, tmp_path, activations="int8")
    x = input_batch(rng, model)
    vm, _, _ = compile_int8(model)
    got, expected = run_tvm(vm, x), run_onnxruntime(model, x)
    assert got.dtype == expected.dtype == np.int8
    np.testing.assert_array_equal(got, expected)


def test_reference_is_onnxruntimes_integer_qlinearconv(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = quantize_qdq(float_conv_model(rng), rng, tmp_path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "QLinearConv" in optimized and "Conv" not in optimized


@pytest.mark.parametrize("mcpu", ["haswell"])
def test_kernel_without_vnni_is_bit_exact_too(mcpu: str, tmp_path: Path) -> None:
    if not host_runs(mcpu):
        pytest.skip(f"this CPU cannot run code built for {mcpu}")
    rng = np.random.default_rng(3)
    model = quantize_qdq(float_conv_model(rng, in_channels=5, out_channels=24), rng, tmp_path)
    x = input_batch(rng, model)
    vm, _, assembly = compile_int8(model, mcpu)
    assert "vpdpbusd" not in assembly
    np.testing.assert_array_equal(run_tvm(vm, x), run_onnxruntime(model, x))


# ---- structure: what is rewritten, what is not -----------------------------------------------


def test_qdq_conv_becomes_one_scheduled_int8_kernel(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    mod, _ = import_bound(quantize_qdq(float_conv_model(rng), rng, tmp_path))
    before = relax_ops(mod)
    assert before.count("relax.quantize") == 2 and "relax.nn.conv2d" in before
    target = x86_target()
    lowered = lower(mod, target)
    # The input's quantize stays; dequantizes, conv, bias add and output quantize are gone.
    assert relax_ops(lowered) == ["relax.quantize", "relax.call_tir"]
    # The target's legalize passes (FuseOps, FuseTIR) keep the scheduled kernel as it is.
    with target:
        legalized = tvm.transform.Sequential(resolve_target("x86").legalize_passes())(lowered)
    kernels = {
        g.name_hint: f
        for g, f in legalized.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and g.name_hint.startswith("conv2d_int8")
    }
    assert len(kernels) == 1
    (kernel,) = kernels.values()
    assert kernel.attrs["tirx.is_scheduled"]
    tvm.ir.assert_structural_equal(kernel, lowered[next(iter(kernels))])
    called = [b.value.args[0] for b in legalized["main"].body.blocks[0].bindings]
    assert [g.name_hint for g in called] == ["quantize", *kernels]


def test_float_conv_is_left_alone() -> None:
    rng = np.random.default_rng(4)
    mod, _ = relax.frontend.detach_params(
        from_onnx(float_conv_model(rng), keep_params_in_input=True)
    )
    lowered = lower(mod, x86_target())
    tvm.ir.assert_structural_equal(lowered, mod)


def dequantized_conv_model(
    rng: np.random.Generator, workdir: Path, **shape: Any
) -> onnx.ModelProto:
    """DQ → Conv with a float output, as detc's quantize pass writes by default (conv outputs
    stay float): the QDQ model with the Q/DQ pair after the convolution removed."""
    qdq = quantize_qdq(float_conv_model(rng, **shape), rng, workdir, keep_output_dequantize=True)
    nodes = list(qdq.graph.node)
    assert [n.op_type for n in nodes[-2:]] == ["QuantizeLinear", "DequantizeLinear"]
    next(n for n in nodes if n.op_type == "Conv").output[0] = "y"
    del qdq.graph.node[-2:]
    read = {name for node in qdq.graph.node for name in node.input}
    kept = [t for t in qdq.graph.initializer if t.name in read]
    del qdq.graph.initializer[:]
    qdq.graph.initializer.extend(kept)
    return qdq


def test_dequantized_conv_without_quantize_is_left_alone(tmp_path: Path) -> None:
    """DQ → Conv with a float output: onnxruntime runs it in float, so by default (bit-exact
    lowering only) the float path keeps it."""
    rng = np.random.default_rng(5)
    mod, _ = import_bound(dequantized_conv_model(rng, tmp_path))
    tvm.ir.assert_structural_equal(lower(mod, x86_target()), mod)
    reasons = {d.reason for d in explain_int8_lowering(mod)}
    assert reasons == {"the quantized value does not come from a convolution"}


@pytest.mark.parametrize("shape", [{}, {"in_channels": 3, "out_channels": 24, "stride": 2}])
def test_float_outputs_mode_lowers_dequantized_convs_within_fp32_tolerance(
    shape: dict[str, Any], tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    model = dequantized_conv_model(rng, tmp_path, **shape)
    x = input_batch(rng, model)
    vm, mod, assembly = compile_int8(model, float_outputs=True)
    assert "relax.nn.conv2d" not in relax_ops(mod) and "vpdpbusd" in assembly
    got, expected = run_tvm(vm, x), run_onnxruntime(model, x)
    assert got.dtype == expected.dtype == np.float32
    # onnxruntime sums float products; the kernel sums integers exactly and scales once.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_conv_whose_float_output_has_another_reader_is_left_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    qdq = quantize_qdq(float_conv_model(rng), rng, tmp_path)
    conv = next(n for n in qdq.graph.node if n.op_type == "Conv")
    dims = [d.dim_value for d in qdq.graph.output[0].type.tensor_type.shape.dim]
    qdq.graph.output.append(helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, dims))
    mod, _ = import_bound(qdq)
    tvm.ir.assert_structural_equal(lower(mod, x86_target()), mod)
    assert any("other users" in d.reason for d in explain_int8_lowering(mod))


def test_relu_before_the_quantize_is_lowered_only_when_approximation_is_allowed(
    tmp_path: Path,
) -> None:
    """quantize_static drops a ReLU into the output range; a ReLU left between Conv and Q makes
    onnxruntime compute the chain in float (FusedConv): the integer kernel may differ by 1."""
    rng = np.random.default_rng(8)
    qdq = quantize_qdq(float_conv_model(rng), rng, tmp_path)
    conv = next(n for n in qdq.graph.node if n.op_type == "Conv")
    conv_out = conv.output[0]
    conv.output[0] = "before_relu"
    position = list(qdq.graph.node).index(conv) + 1
    qdq.graph.node.insert(position, helper.make_node("Relu", ["before_relu"], [conv_out]))
    mod, _ = import_bound(qdq)
    tvm.ir.assert_structural_equal(lower(mod, x86_target()), mod)
    assert any("allow_approximate" in d.reason for d in explain_int8_lowering(mod))

    x = input_batch(rng, qdq)
    vm, lowered, _ = compile_int8(qdq, allow_approximate=True)
    assert "relax.nn.relu" not in relax_ops(lowered)
    got, expected = run_tvm(vm, x).astype(int), run_onnxruntime(qdq, x).astype(int)
    assert np.abs(got - expected).max() <= 1
    quantize = next(
        n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == conv_out
    )
    assert got.min() >= initializer(qdq, quantize.input[2])  # the ReLU held


def insert_silu(model: onnx.ModelProto) -> str:
    """Put SiLU (Sigmoid, Mul) between the convolution and whatever read its output, as YOLO
    detectors have it; returns the name of the convolution's (new) output."""
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    activated = conv.output[0]
    conv.output[0] = "before_silu"
    position = list(model.graph.node).index(conv) + 1
    model.graph.node.insert(position, helper.make_node("Sigmoid", ["before_silu"], ["gate"]))
    model.graph.node.insert(
        position + 1, helper.make_node("Mul", ["before_silu", "gate"], [activated])
    )
    return "before_silu"


def test_silu_before_the_quantize_runs_in_the_kernels_epilogue(tmp_path: Path) -> None:
    """Conv → Sigmoid → Mul → Q (every YOLO block): one kernel with a uint8 output, within 1 of
    onnxruntime, which computes the SiLU in float between its convolution and quantize."""
    rng = np.random.default_rng(12)
    qdq = quantize_qdq(float_conv_model(rng, out_channels=24), rng, tmp_path)
    insert_silu(qdq)
    mod, _ = import_bound(qdq)
    tvm.ir.assert_structural_equal(lower(mod, x86_target()), mod)  # approximate: not by default
    lowered = lower(mod, x86_target(), allow_approximate=True)
    assert relax_ops(lowered) == ["relax.quantize", "relax.call_tir"]
    x = input_batch(rng, qdq)
    vm, _, _ = compile_int8(qdq, allow_approximate=True)
    got, expected = run_tvm(vm, x).astype(int), run_onnxruntime(qdq, x).astype(int)
    assert np.unique(expected).size > 16
    assert np.abs(got - expected).max() <= 1
    assert np.mean(got == expected) > 0.99


def test_silu_on_a_float_output_is_fused_within_fp32_tolerance(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    model = dequantized_conv_model(rng, tmp_path, out_channels=24)
    insert_silu(model)
    x = input_batch(rng, model)
    vm, mod, _ = compile_int8(model, float_outputs=True)
    ops = relax_ops(mod)
    assert "relax.sigmoid" not in ops and "relax.nn.conv2d" not in ops
    np.testing.assert_allclose(run_tvm(vm, x), run_onnxruntime(model, x), rtol=1e-4, atol=1e-5)


def test_silu_whose_input_has_another_reader_is_not_fused(tmp_path: Path) -> None:
    """The pre-activation is a graph output too: the kernel must still produce it, so the
    sigmoid and the multiply stay where they are."""
    rng = np.random.default_rng(14)
    model = dequantized_conv_model(rng, tmp_path)
    before = insert_silu(model)
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    model.graph.output.append(helper.make_tensor_value_info(before, TensorProto.FLOAT, dims))
    mod, _ = import_bound(model)
    lowered_ops = relax_ops(lower(mod, x86_target(), float_outputs=True))
    assert "relax.sigmoid" in lowered_ops and "relax.multiply" in lowered_ops
    assert "relax.nn.conv2d" not in lowered_ops  # the convolution itself is still lowered
    x = input_batch(rng, model)
    vm, _, _ = compile_int8(model, float_outputs=True)
    got = vm["main"](tvm.runtime.tensor(x))
    expected = run_session(ort_session(model, threads=1), {"x": x})
    for got_tensor, want in zip(got, expected.values(), strict=True):
        np.testing.assert_allclose(got_tensor.numpy(), want, rtol=1e-4, atol=1e-5)


def test_sigmoid_after_a_head_reshape_and_transpose_runs_in_the_kernel(tmp_path: Path) -> None:
    """A YOLO head: conv (3 anchors × 8 values) → Reshape → Transpose → Sigmoid. The sigmoid
    commutes with the layout ops; the kernel applies it and the layout ops stay after it."""
    rng = np.random.default_rng(15)
    model = dequantized_conv_model(rng, tmp_path, out_channels=24, kernel=1, pads=(0, 0, 0, 0))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.output[0] = "head"
    shape = numpy_helper.from_array(np.array([1, 3, 8, 9, 9], np.int64))
    model.graph.node.extend(
        [
            helper.make_node("Constant", [], ["head_shape"], value=shape),
            helper.make_node("Reshape", ["head", "head_shape"], ["anchors"]),
            helper.make_node("Transpose", ["anchors"], ["moved"], perm=[0, 1, 3, 4, 2]),
            helper.make_node("Sigmoid", ["moved"], ["y"]),
        ]
    )
    del model.graph.output[:]
    model.graph.output.append(
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 9, 9, 8])
    )
    mod, _ = import_bound(model)
    ops = relax_ops(lower(mod, x86_target(), float_outputs=True))
    assert ops[-3:] == ["relax.call_tir", "relax.reshape", "relax.permute_dims"]
    assert "relax.sigmoid" not in ops
    x = input_batch(rng, model)
    vm, _, _ = compile_int8(model, float_outputs=True)
    np.testing.assert_allclose(run_tvm(vm, x), run_onnxruntime(model, x), rtol=1e-4, atol=1e-5)


def test_bind_quantization_params_binds_only_what_quantization_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    qdq = quantize_qdq(float_conv_model(rng), rng, tmp_path)
    # A float convolution beside the quantized one keeps its weight as a parameter.
    float_weight = rng.normal(0, 1, (4, 8, 1, 1)).astype(np.float32)
    qdq.graph.initializer.append(numpy_helper.from_array(float_weight, "W_float"))
    qdq.graph.node.append(helper.make_node("Conv", ["x", "W_float"], ["z"], name="float_conv"))
    qdq.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 9, 9]))
    mod, remaining = import_bound(qdq)
    assert len(remaining) == 1
    np.testing.assert_array_equal(remaining[0], float_weight)
    assert len(mod["main"].params) == 2  # x and the float weight


# ---- the hardware instruction ----------------------------------------------------------------


@pytest.mark.parametrize("mcpu", VNNI_CPUS + NO_VNNI_CPUS)
def test_vnni_instruction_appears_exactly_when_the_target_has_vnni(
    mcpu: str, tmp_path: Path
) -> None:
    """Compiled, not run: any x86 host can check the code generated for another CPU."""
    rng = np.random.default_rng(10)
    model = quantize_qdq(float_conv_model(rng, size=6), rng, tmp_path)
    _, _, assembly = compile_int8(model, mcpu)
    has_vnni = bool({"avx512_vnni", "avx_vnni"} & REQUIRED_FLAGS[mcpu])
    assert ("vpdpbusd" in assembly) == has_vnni
    if not has_vnni:
        # Exact widening multiply-adds, not the saturating vpmaddubsw.
        assert "vpmaddwd" in assembly and "vpmaddubsw" not in assembly


@pytest.mark.parametrize("tuned", [False, True], ids=["untuned", "tuned-pipeline"])
def test_x86_target_builds_a_qdq_model_with_the_int8_kernel(tuned: bool, tmp_path: Path) -> None:
    """Through the whole x86 build (artifact, runtime): the QDQ convolution runs as the int8
    kernel and its uint8 output equals onnxruntime's integer QLinearConv bit for bit."""
    from detc.targets import build_artifact, load_artifact
    from detc.targets.tuning.options import TuningOptions

    rng = np.random.default_rng(11)
    model = quantize_qdq(float_conv_model(rng, in_channels=16, out_channels=32), rng, tmp_path)
    x = input_batch(rng, model)
    tuning = TuningOptions(tune=False, database=tmp_path / "db") if tuned else None
    build_artifact(
        model, "x86", tmp_path / "out", manifest_fields={}, progress=False, tuning=tuning
    )
    got = load_artifact(tmp_path / "out", num_threads=2)(x)
    np.testing.assert_array_equal(next(iter(got.values())), run_onnxruntime(model, x))


def test_quantize_between_int8_kernels_rounds_ties_to_even_like_onnxruntime() -> None:
    """The glue's QuantizeLinear (TVM's own legalization) must round x/scale = k + 0.5 as
    onnxruntime does, to the even neighbour: half away from zero would differ by 1 at each tie."""
    scale, zero_point = 0.5, 128
    ties = (np.arange(-40, 40, dtype=np.float32) + 0.5) * scale  # x / scale = k + 0.5 exactly
    x = np.concatenate([ties, ties[::-1] + 0.125]).reshape(1, 2, 8, 10).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="quantize")],
        "quantize_ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, list(x.shape))],
        [
            numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
            numpy_helper.from_array(np.asarray(zero_point, np.uint8), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    vm, _, _ = compile_int8(model)
    got, expected = run_tvm(vm, x), run_onnxruntime(model, x)
    assert got.dtype == expected.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    assert np.all(expected[0, 0].ravel().astype(np.int32) % 2 == 0)  # every tie went to even
