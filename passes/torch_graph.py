"""Executing an ONNX graph as a torch function (:class:`TorchGraph`), trainable where asked.

With ``trainable=True`` the Conv weights and biases are torch parameters, and
:meth:`TorchGraph.write_back` writes their trained values into the graph's initializers (what
:mod:`detc.passes.distill` and :mod:`detc.passes.recover` train). A run may start from any
intermediate value (block-wise reconstruction trains one slice of the graph at a time). Only the
ops detectors are built from are executed; any other raises :class:`BadInputError` naming it.

torch is an optional dependency (``pip install detc[torch]``), imported only through
:func:`import_torch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.passes._graph_facts import constant_array


def import_torch() -> Any:
    """torch, or a one-line BadInputError saying how to get it."""
    try:
        import torch
    except ImportError:
        raise BadInputError(
            "distillation and recovery need torch: pip install 'detc[torch]' (or set "
            "distill_steps=0 / leave recover out)"
        ) from None
    return torch


def _ints(value: Any) -> list[int]:
    array = value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
    return [int(v) for v in np.asarray(array).reshape(-1).tolist()]


def _floats(value: Any) -> list[float]:
    array = value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
    return [float(v) for v in np.asarray(array).reshape(-1).tolist()]


_ONNX_TO_TORCH_DTYPE: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


class _Op:
    """Runs one node: ``inputs`` are torch tensors (or None for absent optional inputs)."""

    def __init__(self, node: ir.Node, torch: Any) -> None:
        self.node = node
        self.torch = torch
        self.functional = torch.nn.functional
        self.attrs = node.attributes
        handler = getattr(self, f"_{node.op_type.lower()}", None)
        if node.domain not in ("", "ai.onnx") or handler is None:
            raise BadInputError(
                f"node '{node.name}' ({node.op_type}): distillation and recovery cannot execute "
                "this op; set distill_steps=0 / leave recover out (the supported ops are those "
                "of CNN detectors)"
            )
        self.run: Callable[[list[Any]], list[Any]] = handler

    def _int(self, name: str, default: int) -> int:
        attr = self.attrs.get(name)
        return default if attr is None else int(attr.as_int())

    def _float(self, name: str, default: float) -> float:
        attr = self.attrs.get(name)
        return default if attr is None else float(attr.as_float())

    def _int_list(self, name: str, default: list[int] | None) -> list[int] | None:
        attr = self.attrs.get(name)
        return default if attr is None else [int(v) for v in attr.as_ints()]

    def _string(self, name: str, default: str) -> str:
        attr = self.attrs.get(name)
        return default if attr is None else str(attr.as_string())

    def _fail(self, why: str) -> BadInputError:
        return BadInputError(
            f"node '{self.node.name}' ({self.node.op_type}): distillation and recovery cannot "
            f"execute {why}; set distill_steps=0 / leave recover out"
        )

    # elementwise
    def _identity(self, x: list[Any]) -> list[Any]:
        return [x[0]]

    def _sigmoid(self, x: list[Any]) -> list[Any]:
        return [self.torch.sigmoid(x[0])]

    def _relu(self, x: list[Any]) -> list[Any]:
        return [self.torch.relu(x[0])]

    def _leakyrelu(self, x: list[Any]) -> list[Any]:
        return [self.functional.leaky_relu(x[0], self._float("alpha", 0.01))]

    def _tanh(self, x: list[Any]) -> list[Any]:
        return [self.torch.tanh(x[0])]

    def _exp(self, x: list[Any]) -> list[Any]:
        return [self.torch.exp(x[0])]

    def _hardsigmoid(self, x: list[Any]) -> list[Any]:
        alpha, beta = self._float("alpha", 0.2), self._float("beta", 0.5)
        return [self.torch.clamp(alpha * x[0] + beta, 0.0, 1.0)]

    def _hardswish(self, x: list[Any]) -> list[Any]:
        return [x[0] * self.torch.clamp(x[0] / 6.0 + 0.5, 0.0, 1.0)]

    def _clip(self, x: list[Any]) -> list[Any]:
        low = float(x[1]) if len(x) > 1 and x[1] is not None else None
        high = float(x[2]) if len(x) > 2 and x[2] is not None else None
        return [self.torch.clamp(x[0], low, high)]

    def _add(self, x: list[Any]) -> list[Any]:
        return [x[0] + x[1]]

    def _sub(self, x: list[Any]) -> list[Any]:
        return [x[0] - x[1]]

    def _mul(self, x: list[Any]) -> list[Any]:
        return [x[0] * x[1]]

    def _div(self, x: list[Any]) -> list[Any]:
        if not x[0].is_floating_point():
            return [self.torch.div(x[0], x[1], rounding_mode="trunc")]
        return [x[0] / x[1]]

    def _pow(self, x: list[Any]) -> list[Any]:
        return [self.torch.pow(x[0], x[1])]

    def _softmax(self, x: list[Any]) -> list[Any]:
        return [self.torch.softmax(x[0], dim=self._int("axis", -1))]

    def _cast(self, x: list[Any]) -> list[Any]:
        name = _ONNX_TO_TORCH_DTYPE.get(self._int("to", 0))
        if name is None:
            raise self._fail(f"a cast to ONNX type {self._int('to', 0)}")
        return [x[0].to(getattr(self.torch, name))]

    # convolution, normalisation, pooling
    def _conv(self, x: list[Any]) -> list[Any]:
        data, weight = x[0], x[1]
        bias = x[2] if len(x) > 2 else None
        dims = weight.dim() - 2
        if dims not in (1, 2, 3):
            raise self._fail(f"a {dims}-d convolution")
        strides = self._int_list("strides", [1] * dims) or [1] * dims
        dilations = self._int_list("dilations", [1] * dims) or [1] * dims
        kernel = list(weight.shape[2:])
        pads = self._pads(data, kernel, strides, dilations)
        data, padding = self._apply_pads(data, pads, 0.0)
        conv = getattr(self.functional, f"conv{dims}d")
        return [
            conv(data, weight, bias, strides, padding, dilations, self._int("group", 1)),
        ]

    def _pads(
        self, data: Any, kernel: list[int], strides: list[int], dilations: list[int]
    ) -> list[int]:
        dims = len(kernel)
        auto_pad = self._string("auto_pad", "NOTSET")
        if auto_pad in ("NOTSET", "VALID"):
            explicit = self._int_list("pads", None)
            return [0] * (2 * dims) if auto_pad == "VALID" or explicit is None else explicit
        begins, ends = [], []
        for axis in range(dims):
            size = int(data.shape[2 + axis])
            out = -(-size // strides[axis])
            extent = (kernel[axis] - 1) * dilations[axis] + 1
            total = max(0, (out - 1) * strides[axis] + extent - size)
            small = total // 2
            begin = small if auto_pad == "SAME_UPPER" else total - small
            begins.append(begin)
            ends.append(total - begin)
        return begins + ends

    def _apply_pads(self, data: Any, pads: list[int], fill: float) -> tuple[Any, list[int]]:
        """Symmetric pads go to the op; others are applied here (torch pads symmetrically)."""
        dims = len(pads) // 2
        begins, ends = pads[:dims], pads[dims:]
        if begins == ends:
            return data, begins
        spec: list[int] = []
        for axis in reversed(range(dims)):
            spec += [begins[axis], ends[axis]]
        return self.functional.pad(data, spec, value=fill), [0] * dims

    def _batchnormalization(self, x: list[Any]) -> list[Any]:
        if len(self.node.outputs) > 1 and any(o is not None for o in self.node.outputs[1:]):
            raise self._fail("a training-mode BatchNormalization")
        data, scale, shift, mean, var = x[:5]
        shape = [1, -1] + [1] * (data.dim() - 2)
        factor = scale / self.torch.sqrt(var + self._float("epsilon", 1e-5))
        return [(data - mean.reshape(shape)) * factor.reshape(shape) + shift.reshape(shape)]

    def _maxpool(self, x: list[Any]) -> list[Any]:
        if len(self.node.outputs) > 1 and self.node.outputs[1] is not None:
            raise self._fail("MaxPool's Indices output")
        data = x[0]
        kernel = self._int_list("kernel_shape", None)
        if kernel is None:
            raise self._fail("a MaxPool without kernel_shape")
        dims = len(kernel)
        if dims not in (1, 2, 3):
            raise self._fail(f"a {dims}-d MaxPool")
        strides = self._int_list("strides", [1] * dims) or [1] * dims
        dilations = self._int_list("dilations", [1] * dims) or [1] * dims
        pads = self._pads(data, kernel, strides, dilations)
        if any(pads):  # padded here with -inf: torch limits its own padding to half a kernel
            spec: list[int] = []
            for axis in reversed(range(dims)):
                spec += [pads[axis], pads[dims + axis]]
            data = self.functional.pad(data, spec, value=-math.inf)
        pool = getattr(self.functional, f"max_pool{dims}d")
        ceil_mode = bool(self._int("ceil_mode", 0))
        return [pool(data, kernel, strides, 0, dilations, ceil_mode=ceil_mode)]

    def _globalaveragepool(self, x: list[Any]) -> list[Any]:
        return [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)]

    def _globalmaxpool(self, x: list[Any]) -> list[Any]:
        return [self.torch.amax(x[0], dim=tuple(range(2, x[0].dim())), keepdim=True)]

    def _resize(self, x: list[Any]) -> list[Any]:
        if self._string("mode", "nearest") != "nearest":
            raise self._fail(f"Resize mode={self._string('mode', 'nearest')} (only nearest)")
        data = x[0]
        scales = _floats(x[2]) if len(x) > 2 and x[2] is not None and x[2].numel() else None
        sizes = _ints(x[3]) if len(x) > 3 and x[3] is not None and x[3].numel() else None
        if self._int_list("axes", None) is not None:
            raise self._fail("Resize with axes")
        transform = self._string("coordinate_transformation_mode", "half_pixel")
        rounding = self._string("nearest_mode", "round_prefer_floor")
        for axis in range(data.dim()):
            size_in = int(data.shape[axis])
            if sizes is not None:
                size_out, scale = sizes[axis], sizes[axis] / size_in
            elif scales is not None:
                scale = scales[axis]
                size_out = math.floor(size_in * scale)
            else:
                raise self._fail("a Resize with neither scales nor sizes")
            if size_out == size_in and scale == 1.0:
                continue
            index = _nearest_source(size_in, size_out, scale, transform, rounding)
            if index is None:
                raise self._fail(f"Resize coordinate_transformation_mode={transform}")
            data = data.index_select(axis, self.torch.as_tensor(index, device=data.device))
        return [data]

    # layout
    def _concat(self, x: list[Any]) -> list[Any]:
        return [self.torch.cat([t for t in x if t is not None], dim=self._int("axis", 0))]

    def _reshape(self, x: list[Any]) -> list[Any]:
        shape = _ints(x[1])
        if not self._int("allowzero", 0):
            shape = [int(x[0].shape[i]) if s == 0 else s for i, s in enumerate(shape)]
        return [x[0].reshape(shape)]

    def _flatten(self, x: list[Any]) -> list[Any]:
        axis = self._int("axis", 1) % max(x[0].dim(), 1)
        lead = int(np.prod([int(s) for s in x[0].shape[:axis]]))
        return [x[0].reshape(lead, -1)]

    def _transpose(self, x: list[Any]) -> list[Any]:
        perm = self._int_list("perm", None) or list(reversed(range(x[0].dim())))
        return [x[0].permute(perm)]

    def _split(self, x: list[Any]) -> list[Any]:
        data, axis = x[0], self._int("axis", 0)
        count = len(self.node.outputs)
        if len(x) > 1 and x[1] is not None:
            sizes = _ints(x[1])
        elif self._int_list("split", None) is not None:
            sizes = self._int_list("split", None) or []
        else:
            parts = self._int("num_outputs", count)
            step = -(-int(data.shape[axis]) // parts)
            sizes = [min(step, int(data.shape[axis]) - i * step) for i in range(parts)]
        return list(self.torch.split(data, sizes, dim=axis))

    def _slice(self, x: list[Any]) -> list[Any]:
        data = x[0]
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
        index: list[slice] = [slice(None)] * data.dim()
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            if step < 1:
                raise self._fail("a Slice with a negative step")
            index[axis % data.dim()] = slice(start, end, step)
        return [data[tuple(index)]]

    def _shape(self, x: list[Any]) -> list[Any]:
        shape = [int(s) for s in x[0].shape]
        start, end = self._int("start", 0), self.attrs.get("end")
        chosen = shape[start:] if end is None else shape[start : int(end.as_int())]
        return [self.torch.tensor(chosen, dtype=self.torch.int64)]

    def _gather(self, x: list[Any]) -> list[Any]:
        data, indices = x[0], x[1].long()
        axis = self._int("axis", 0) % data.dim()
        indices = self.torch.where(indices < 0, indices + int(data.shape[axis]), indices)
        picked = data.index_select(axis, indices.reshape(-1))
        shape = list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1 :])
        return [picked.reshape(shape)]

    def _unsqueeze(self, x: list[Any]) -> list[Any]:
        axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else self._int_list("axes", [])
        out = x[0]
        rank = out.dim() + len(axes or [])
        for axis in sorted(a % rank for a in axes or []):
            out = out.unsqueeze(axis)
        return [out]

    def _squeeze(self, x: list[Any]) -> list[Any]:
        axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else self._int_list("axes", None)
        if axes is None:
            return [x[0].squeeze()]
        out = x[0]
        for axis in sorted((a % out.dim() for a in axes), reverse=True):
            out = out.squeeze(axis)
        return [out]


def _nearest_source(
    size_in: int, size_out: int, scale: float, transform: str, rounding: str
) -> np.ndarray | None:
    """For each output position of a nearest Resize along one axis, the input position read."""
    out = np.arange(size_out, dtype=np.float64)
    if transform == "asymmetric":
        source = out / scale
    elif transform == "half_pixel":
        source = (out + 0.5) / scale - 0.5
    elif transform == "pytorch_half_pixel":
        source = (out + 0.5) / scale - 0.5 if size_out > 1 else np.zeros_like(out)
    elif transform == "tf_half_pixel_for_nn":
        source = (out + 0.5) / scale
    elif transform == "align_corners":
        source = out * (size_in - 1) / (size_out - 1) if size_out > 1 else np.zeros_like(out)
    else:
        return None
    if rounding == "floor":
        index = np.floor(source)
    elif rounding == "ceil":
        index = np.ceil(source)
    elif rounding == "round_prefer_ceil":
        index = np.floor(source + 0.5)
    else:  # round_prefer_floor
        index = np.ceil(source - 0.5)
    return np.clip(index, 0, size_in - 1).astype(np.int64)


class TorchGraph:
    """An ONNX graph as a torch function; Conv weights and biases are parameters.

    ``run(inputs, wanted)`` executes only the nodes ``wanted`` values depend on, so a model can
    be run up to its head Convs at any input size even where its decoder reshapes to fixed
    shapes. With ``trainable`` the float Conv weight/bias initializers require grad;
    :meth:`write_back` stores their current values in the graph.
    """

    def __init__(self, graph: ir.Graph, *, trainable: bool = False) -> None:
        self.torch = import_torch()
        self.graph = graph
        self.constants: dict[str, Any] = {}
        self.parameters: dict[str, Any] = {}
        self._ops: dict[int, _Op] = {}
        self._producer: dict[str, ir.Node] = {}
        for node in graph:
            for output in node.outputs:
                if output is not None and output.name:
                    self._producer[output.name] = node
            if node.op_type == "Constant":
                continue
            self._ops[id(node)] = _Op(node, self.torch)
            for position, value in enumerate(node.inputs):
                if value is None or not value.name or value.name in self.constants:
                    continue
                array = constant_array(value)
                if array is None:
                    continue
                tensor = self.torch.from_numpy(np.array(array, copy=True))
                is_parameter = (
                    trainable
                    and node.op_type == "Conv"
                    and position in (1, 2)
                    and value.is_initializer()
                    and tensor.is_floating_point()
                )
                if is_parameter:
                    tensor = tensor.float().requires_grad_(True)
                    self.parameters[value.name] = tensor
                self.constants[value.name] = tensor
        self._order = {id(node): i for i, node in enumerate(graph)}

    def producer(self, name: str) -> ir.Node | None:
        return self._producer.get(name)

    def _plan(self, wanted: Sequence[str], given: frozenset[str]) -> list[ir.Node]:
        needed: dict[int, ir.Node] = {}
        stack = [
            self._producer[name] for name in wanted if name in self._producer and name not in given
        ]
        missing = [n for n in wanted if n not in self._producer and n not in self.constants]
        inputs = {v.name for v in self.graph.inputs} | given
        if any(name not in inputs for name in missing):
            raise BadInputError(f"values {missing} are not computed by graph '{self.graph.name}'")
        while stack:
            node = stack.pop()
            if id(node) in needed or node.op_type == "Constant":
                continue
            needed[id(node)] = node
            for value in node.inputs:
                if (
                    value is not None
                    and value.name
                    and value.name not in self.constants
                    and value.name not in given
                ):
                    producer = self._producer.get(value.name)
                    if producer is not None:
                        stack.append(producer)
        return sorted(needed.values(), key=lambda n: self._order[id(n)])

    def nodes_between(self, given: Sequence[str], wanted: Sequence[str]) -> list[ir.Node]:
        """The nodes :meth:`run` executes to compute ``wanted`` from the values ``given``."""
        return self._plan(wanted, frozenset(given))

    def run(self, inputs: dict[str, Any], wanted: Sequence[str]) -> dict[str, Any]:
        """The ``wanted`` values for ``inputs`` (torch tensors or numpy arrays).

        ``inputs`` are graph inputs or any intermediate values: a value given is not recomputed,
        so a slice of the graph runs on its own (what block-wise reconstruction trains).
        """
        values: dict[str, Any] = dict(self.constants)
        for name, array in inputs.items():
            values[name] = (
                array
                if isinstance(array, self.torch.Tensor)
                else self.torch.from_numpy(np.ascontiguousarray(array))
            )
        for node in self._plan(wanted, frozenset(inputs)):
            args = [None if v is None or not v.name else values[v.name] for v in node.inputs]
            results = self._ops[id(node)].run(args)
            for output, result in zip(node.outputs, results, strict=False):
                if output is not None and output.name:
                    values[output.name] = result
        return {name: values[name] for name in wanted}

    def write_back(self) -> None:
        """Store the parameters' current values in their initializers (dtype kept)."""
        for name, tensor in self.parameters.items():
            value = self.graph.initializers[name]
            assert value.const_value is not None
            dtype = value.const_value.numpy().dtype
            array = tensor.detach().cpu().numpy().astype(dtype)
            value.const_value = ir.tensor(array, name=name)

    def snapshot(self) -> dict[str, Any]:
        return {name: t.detach().clone() for name, t in self.parameters.items()}

    def restore(self, saved: dict[str, Any]) -> None:
        with self.torch.no_grad():
            for name, tensor in self.parameters.items():
                tensor.copy_(saved[name])
