"""Tiny models built in code for the pass tests, and helpers to run them in onnxruntime.

Every builder takes a seeded ``numpy.random.Generator`` and returns an ``onnx_ir`` model whose
graph input is ``x`` and output ``y``, with nodes named so tests can assert ``explain`` reasons.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from detc.compiler.ir.pass_base import DetcPass
from detc.compiler.reference import ort_session, run_session
from detc.compiler.tolerances import Tolerance

OPSET = 17
IR_VERSION = 9  # what onnxruntime accepts everywhere we test


def value_info(name: str, dtype: np.dtype | type, shape: Sequence[int]) -> onnx.ValueInfoProto:
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Mapping[str, np.ndarray] | None = None,
    *,
    opset: int = OPSET,
) -> ir.Model:
    """An ``onnx_ir`` model from helper-built nodes; checked by the ONNX checker first."""
    tensors = [onnx.numpy_helper.from_array(a, name) for name, a in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), tensors)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def constant_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A Constant node named ``name`` whose output is also called ``name``."""
    return helper.make_node(
        "Constant", [], [name], name=name, value=onnx.numpy_helper.from_array(array, name)
    )


def conv_params(
    rng: np.random.Generator,
    *,
    in_channels: int,
    out_channels: int,
    groups: int,
    kernel: int,
    dtype: np.dtype | type,
) -> tuple[np.ndarray, np.ndarray]:
    weight = rng.normal(0.0, 0.5, (out_channels, in_channels // groups, kernel, kernel))
    bias = rng.normal(0.0, 0.5, out_channels)
    return weight.astype(dtype), bias.astype(dtype)


def batchnorm_params(
    rng: np.random.Generator, channels: int, dtype: np.dtype | type
) -> dict[str, np.ndarray]:
    """gamma, beta, mean, var far from the identity (1, 0, 0, 1), so a wrong fold shows."""
    return {
        "gamma": rng.uniform(0.5, 2.0, channels).astype(dtype),
        "beta": rng.normal(0.0, 1.0, channels).astype(dtype),
        "mean": rng.normal(0.0, 1.0, channels).astype(dtype),
        "var": rng.uniform(0.2, 3.0, channels).astype(dtype),
    }


def conv_bn_model(
    rng: np.random.Generator,
    *,
    groups: int = 1,
    bias: bool = True,
    dtype: np.dtype | type = np.float32,
    in_channels: int = 4,
    out_channels: int = 8,
    kernel: int = 3,
    size: int = 6,
    constant_nodes: bool = False,
    epsilon: float = 1e-3,
    bn_attributes: Mapping[str, Any] | None = None,
    bn_extra_outputs: Sequence[str] = (),
    extra_conv_reader: bool = False,
) -> ir.Model:
    """x → Conv 'conv' → BatchNormalization 'bn' → y.

    ``constant_nodes`` stores the parameters in Constant nodes instead of initializers;
    ``bn_extra_outputs`` names BatchNormalization's running-statistics outputs (training mode);
    ``extra_conv_reader`` adds ``z = Relu 'extra'(conv output)`` as a second graph output.
    """
    weight, conv_bias = conv_params(
        rng,
        in_channels=in_channels,
        out_channels=out_channels,
        groups=groups,
        kernel=kernel,
        dtype=dtype,
    )
    params = {"w": weight, **({"b": conv_bias} if bias else {})}
    params.update(batchnorm_params(rng, out_channels, dtype))
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w", "b"] if bias else ["x", "w"],
            ["conv_out"],
            name="conv",
            group=groups,
            pads=[kernel // 2] * 4,
        ),
        helper.make_node(
            "BatchNormalization",
            ["conv_out", "gamma", "beta", "mean", "var"],
            ["y", *bn_extra_outputs],
            name="bn",
            epsilon=epsilon,
            **(bn_attributes or {}),
        ),
    ]
    outputs = [value_info("y", dtype, [1, out_channels, size, size])]
    if extra_conv_reader:
        nodes.append(helper.make_node("Relu", ["conv_out"], ["z"], name="extra"))
        outputs.append(value_info("z", dtype, [1, out_channels, size, size]))
    initializers: dict[str, np.ndarray] = {}
    if constant_nodes:
        nodes = [constant_node(name, array) for name, array in params.items()] + nodes
    else:
        initializers = params
    return make_model(
        nodes, [value_info("x", dtype, [1, in_channels, size, size])], outputs, initializers
    )


def conv_mul_add_model(
    rng: np.random.Generator,
    *,
    scale_shape: Sequence[int] | None = (8, 1, 1),
    shift_shape: Sequence[int] | None = (8, 1, 1),
    bias: bool = True,
    groups: int = 1,
    in_channels: int = 4,
    out_channels: int = 8,
    size: int = 6,
    dtype: np.dtype | type = np.float32,
    constant_first: bool = False,
) -> ir.Model:
    """x → Conv 'conv' → [Mul 'mul' by 'scale'] → [Add 'add' of 'shift'] → Relu 'relu' → y.

    ``constant_first`` writes the constants as the first operand (``Mul(scale, conv)``).
    """

    def operands(value: str, constant: str) -> list[str]:
        return [constant, value] if constant_first else [value, constant]

    weight, conv_bias = conv_params(
        rng,
        in_channels=in_channels,
        out_channels=out_channels,
        groups=groups,
        kernel=3,
        dtype=dtype,
    )
    initializers = {"w": weight, **({"b": conv_bias} if bias else {})}
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w", "b"] if bias else ["x", "w"],
            ["conv_out"],
            name="conv",
            group=groups,
            pads=[1, 1, 1, 1],
        )
    ]
    current = "conv_out"
    output_shapes: list[tuple[int, ...]] = [(1, out_channels, size, size)]
    output_shapes += [tuple(s) for s in (scale_shape, shift_shape) if s is not None]
    if scale_shape is not None:
        initializers["scale"] = rng.uniform(0.5, 2.0, tuple(scale_shape)).astype(dtype)
        nodes.append(helper.make_node("Mul", operands(current, "scale"), ["scaled"], name="mul"))
        current = "scaled"
    if shift_shape is not None:
        initializers["shift"] = rng.normal(0.0, 1.0, tuple(shift_shape)).astype(dtype)
        nodes.append(helper.make_node("Add", operands(current, "shift"), ["shifted"], name="add"))
        current = "shifted"
    nodes.append(helper.make_node("Relu", [current], ["y"], name="relu"))
    return make_model(
        nodes,
        [value_info("x", dtype, [1, in_channels, size, size])],
        # some tests give constants that broadcast beyond the Conv's output on purpose
        [value_info("y", dtype, np.broadcast_shapes(*output_shapes))],
        initializers,
    )


# --- running -------------------------------------------------------------------------------------


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model


def run_ort(
    model: ir.Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Outputs by name, with onnxruntime's own graph rewrites off: the reference is the graph."""
    return run_session(ort_session(to_proto(model), optimize=False), feeds)


def random_inputs(model: ir.Model, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Uniform [-1, 1) inputs for every graph input of ``model`` (static shapes only)."""
    feeds = {}
    for value in model.graph.inputs:
        assert value.shape is not None and value.dtype is not None and value.name
        shape = tuple(int(d) for d in value.shape)  # type: ignore[arg-type]
        feeds[value.name] = rng.uniform(-1.0, 1.0, shape).astype(value.dtype.numpy())
    return feeds


def constant(value: ir.Value | None) -> np.ndarray:
    """The tensor an initializer holds (failing the test when ``value`` holds none)."""
    assert value is not None and value.const_value is not None, value
    return value.const_value.numpy()


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def assert_outputs_close(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], tolerance: Tolerance
) -> None:
    """Same output names, dtypes and shapes, and values within ``tolerance``."""
    assert sorted(actual) == sorted(expected)
    for name, reference in expected.items():
        assert actual[name].dtype == reference.dtype, name
        np.testing.assert_allclose(
            actual[name].astype(np.float64),
            reference.astype(np.float64),
            rtol=tolerance.rtol,
            atol=tolerance.atol,
            err_msg=f"output {name}",
        )


def explain_reasons(pass_: DetcPass, model: ir.Model) -> dict[str, str]:
    """``explain`` as {node name: reason}, with ``""`` for the nodes the pass fires on."""
    return {c.node: ("" if c.fires else c.reason) for c in pass_.explain(model)}


# --- torch ---------------------------------------------------------------------------------------


def conv_bn_silu_torch_export(
    tmp_path: Path, *, dynamo: bool = True, seed: int = 0, size: int = 16
) -> Path:
    """A Conv+BatchNorm+SiLU network exported UN-fused to ``tmp_path/conv_bn_silu.onnx``.

    Blocks: plain (3→8), grouped (8→8, groups=2, with a 1x1 Conv inside a residual Add) and
    depthwise (8→8, groups=8, with conv bias). BatchNorm statistics are randomised so that a
    wrong fold cannot hide behind the identity defaults. ``dynamo=True`` uses the torch.export
    exporter with its optimizer off (``optimize=False``: it would fold BN itself); ``False``
    uses the TorchScript exporter with ``do_constant_folding=False`` for the same reason.
    """
    import torch

    torch.manual_seed(seed)

    class ConvBnSilu(torch.nn.Module):
        def __init__(self, cin: int, cout: int, k: int, groups: int = 1, bias: bool = False):
            super().__init__()
            self.conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
            self.bn = torch.nn.BatchNorm2d(cout, eps=1e-3)
            self.act = torch.nn.SiLU()
            mean, var = self.bn.running_mean, self.bn.running_var
            assert mean is not None and var is not None
            with torch.no_grad():
                self.bn.weight.uniform_(0.5, 2.0)
                self.bn.bias.normal_()
                mean.normal_()
                var.uniform_(0.2, 3.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.bn(self.conv(x)))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = ConvBnSilu(3, 8, 3)
            self.grouped = ConvBnSilu(8, 8, 3, groups=2)
            self.pointwise = ConvBnSilu(8, 8, 1)
            self.depthwise = ConvBnSilu(8, 8, 3, groups=8, bias=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            y = y + self.pointwise(self.grouped(y))
            return self.depthwise(y)

    net = Net().eval()
    example = torch.rand(1, 3, size, size)
    path = tmp_path / "conv_bn_silu.onnx"
    with warnings.catch_warnings():
        # the legacy exporter warns that it is legacy, the new one about torch internals
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if dynamo:
            torch.onnx.export(
                net,
                (example,),
                path,
                dynamo=True,
                optimize=False,
                external_data=False,
                input_names=["x"],
                output_names=["y"],
                verbose=False,
            )
        else:
            torch.onnx.export(
                net,
                (example,),
                path,
                dynamo=False,
                do_constant_folding=False,
                input_names=["x"],
                output_names=["y"],
                opset_version=OPSET,
            )
    return path
