"""Distillation: train a pruned model's Convs to reproduce the original's features, label-free.

Least squares refits one Conv at a time against the original's output; on a compact detector
the small errors it leaves compound through the layers after it. Distillation trains every Conv
of the pruned model (the *student*) at once, by gradient descent, so that its Conv outputs match
the original's (the *teacher*) on the same input: no labels, the teacher is the target.

The ONNX graph is executed as a torch function (:class:`TorchGraph`) whose Conv weights and
biases are the trainable parameters; the trained values are written back into the initializers,
so the model keeps its structure and names. Only the ops detectors are built from are executed;
any other raises :class:`BadInputError` naming it.

What is matched: the output of every Conv the student shares with the teacher (same name, same
channel count) — intermediate features, which constrain the fit far more than the outputs
alone — and the detection heads (Convs no other Conv reads; compared after the
Sigmoid their outputs go through, when they do). Each target counts by its error relative to the
teacher's variance there, so wide early layers do not drown the heads.

A few dozen calibration images are made into many inputs by label-free augmentation: random
rescaling and cropping at ``size`` x ``size`` (objects keep roughly their native scale, which is
what the model will see), 2 x 2 mosaics, horizontal flips and colour jitter. Training at a
reduced size is cheap, and what a Conv computes does not depend on the image size.

Measured on yolov5n pruned by 20 % of its MACs (32 calibration images of coco64, 150 steps at
512 px): mAP on the calibration images 31.5 → 36.0, on 32 other images 20.2 → 17.3. With so few
images it fits them and generalises worse; it is off by default (``distill_steps=0``).

torch is an optional dependency (``pip install detc[torch]``), imported only here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.passes._graph_facts import constant_array

logger = logging.getLogger(__name__)

#: letterbox padding of YOLO-style preprocessing, the colour an empty canvas starts with
_PAD_VALUE = 114.0 / 255.0
#: at most this many calibration images (unaugmented) measure the loss before and after
_CHECK_IMAGES = 4

#: ops whose output shape/layout is a rearrangement: a Sigmoid after them acts elementwise on
#: the head Conv's own values
_REARRANGING = frozenset({"Reshape", "Transpose", "Split", "Slice", "Identity", "Flatten"})


def import_torch() -> Any:
    """torch, or a one-line BadInputError saying how to get it."""
    try:
        import torch
    except ImportError:
        raise BadInputError(
            "distillation needs torch: pip install 'detc[torch]' (or set distill_steps=0)"
        ) from None
    return torch


# --- executing an ONNX graph with torch -------------------------------------------------------


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
                f"node '{node.name}' ({node.op_type}): distillation cannot execute this op; "
                "set distill_steps=0 (the supported ops are those of CNN detectors)"
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
            f"node '{self.node.name}' ({self.node.op_type}): distillation cannot execute {why}; "
            "set distill_steps=0"
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

    def _plan(self, wanted: Sequence[str]) -> list[ir.Node]:
        needed: dict[int, ir.Node] = {}
        stack = [self._producer[name] for name in wanted if name in self._producer]
        missing = [n for n in wanted if n not in self._producer and n not in self.constants]
        inputs = {v.name for v in self.graph.inputs}
        if any(name not in inputs for name in missing):
            raise BadInputError(f"values {missing} are not computed by graph '{self.graph.name}'")
        while stack:
            node = stack.pop()
            if id(node) in needed or node.op_type == "Constant":
                continue
            needed[id(node)] = node
            for value in node.inputs:
                if value is not None and value.name and value.name not in self.constants:
                    producer = self._producer.get(value.name)
                    if producer is not None:
                        stack.append(producer)
        return sorted(needed.values(), key=lambda n: self._order[id(n)])

    def run(self, inputs: dict[str, Any], wanted: Sequence[str]) -> dict[str, Any]:
        """The ``wanted`` values for graph ``inputs`` (torch tensors or numpy arrays)."""
        values: dict[str, Any] = dict(self.constants)
        for name, array in inputs.items():
            values[name] = (
                array
                if isinstance(array, self.torch.Tensor)
                else self.torch.from_numpy(np.ascontiguousarray(array))
            )
        for node in self._plan(wanted):
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


# --- what is matched --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A tensor the student must reproduce: a Conv output shared with the teacher."""

    name: str
    head: bool  # no Conv reads it (downstream): the model's interface
    sigmoid: bool  # compared after a Sigmoid (which every use of it goes through)


def _reaches_conv(value: ir.Value, seen: set[int]) -> bool:
    for user, _ in value.uses():
        if id(user) in seen:
            continue
        seen.add(id(user))
        if user.op_type == "Conv":
            return True
        if any(out is not None and _reaches_conv(out, seen) for out in user.outputs):
            return True
    return False


def _ends_in_sigmoid(value: ir.Value) -> bool:
    uses = list(value.uses())
    if not uses or value.is_graph_output():
        return False
    for user, _ in uses:
        if user.op_type == "Sigmoid":
            continue
        if user.op_type not in _REARRANGING:
            return False
        outputs = [o for o in user.outputs if o is not None]
        if not outputs or not all(_ends_in_sigmoid(o) for o in outputs):
            return False
    return True


def distill_targets(student: ir.Graph, teacher: ir.Graph, *, features: bool) -> list[Target]:
    """Conv outputs of ``student`` the teacher has too, with the same channel count."""
    teacher_channels: dict[str, int] = {}
    for node in teacher:
        if node.op_type == "Conv" and node.outputs[0].name:
            weight = constant_array(node.inputs[1])
            if weight is not None:
                teacher_channels[node.outputs[0].name] = int(weight.shape[0])
    targets = []
    for node in student:
        output = node.outputs[0] if node.outputs else None
        if node.op_type != "Conv" or output is None or not output.name:
            continue
        weight = constant_array(node.inputs[1])
        if weight is None or teacher_channels.get(output.name) != int(weight.shape[0]):
            continue
        head = not _reaches_conv(output, set())
        if head or features:
            targets.append(Target(output.name, head, head and _ends_in_sigmoid(output)))
    return targets


# --- label-free augmentation ------------------------------------------------------------------


class _Views:
    """Random training inputs of ``size`` x ``size`` made from the calibration images."""

    def __init__(self, images: Sequence[np.ndarray], size: int, seed: int, torch: Any) -> None:
        self.torch = torch
        self.images = [torch.from_numpy(np.ascontiguousarray(i, dtype=np.float32)) for i in images]
        self.size = size
        self.rng = np.random.default_rng(seed)

    def _tile(self, image: Any, height: int, width: int) -> Any:
        """A ``height`` x ``width`` crop of ``image`` rescaled by a random factor around 1."""
        functional = self.torch.nn.functional
        scale = float(self.rng.uniform(0.6, 1.4))
        rows, cols = image.shape[-2:]
        new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
        resized = functional.interpolate(
            image, size=(new_rows, new_cols), mode="bilinear", align_corners=False
        )
        canvas = image.new_full((image.shape[0], image.shape[1], height, width), _PAD_VALUE)
        top = int(self.rng.integers(min(0, new_rows - height), max(0, new_rows - height) + 1))
        left = int(self.rng.integers(min(0, new_cols - width), max(0, new_cols - width) + 1))
        src_top, src_left = max(top, 0), max(left, 0)
        dst_top, dst_left = src_top - top, src_left - left
        rows_copied = min(new_rows - src_top, height - dst_top)
        cols_copied = min(new_cols - src_left, width - dst_left)
        if rows_copied > 0 and cols_copied > 0:
            canvas[..., dst_top : dst_top + rows_copied, dst_left : dst_left + cols_copied] = (
                resized[..., src_top : src_top + rows_copied, src_left : src_left + cols_copied]
            )
        return canvas

    def _pick(self) -> Any:
        return self.images[int(self.rng.integers(len(self.images)))]

    def view(self, mosaic: float) -> Any:
        size = self.size
        if self.rng.random() < mosaic:
            row = int(self.rng.integers(size // 4, 3 * size // 4 + 1))
            col = int(self.rng.integers(size // 4, 3 * size // 4 + 1))
            top = self.torch.cat(
                [self._tile(self._pick(), row, col), self._tile(self._pick(), row, size - col)],
                dim=3,
            )
            bottom = self.torch.cat(
                [
                    self._tile(self._pick(), size - row, col),
                    self._tile(self._pick(), size - row, size - col),
                ],
                dim=3,
            )
            out = self.torch.cat([top, bottom], dim=2)
        else:
            out = self._tile(self._pick(), size, size)
        if self.rng.random() < 0.5:
            out = out.flip(3)
        gains = self.rng.uniform(0.9, 1.1, size=out.shape[1]) * self.rng.uniform(0.75, 1.25)
        contrast = float(self.rng.uniform(0.8, 1.2))
        mean = out.mean()
        out = (out - mean) * contrast + mean
        out = out * self.torch.tensor(gains, dtype=out.dtype).reshape(1, -1, 1, 1)
        return out.clamp(0.0, 1.0)

    def batch(self, count: int, mosaic: float) -> Any:
        return self.torch.cat([self.view(mosaic) for _ in range(count)], dim=0)


# --- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 300
    size: int = 320
    batch: int = 4
    lr: float = 1e-4
    features: bool = True
    mosaic: float = 0.5  # share of training inputs that are 2 x 2 mosaics
    seed: int = 0
    threads: int = 2


@dataclass(frozen=True)
class DistillResult:
    loss_before: float  # on the unaugmented calibration images: the least-squares starting point
    loss_after: float
    steps: int
    seconds: float
    targets: int
    heads: int
    kept: bool  # the trained weights were kept (False: training made the check loss worse)


def _loss(
    torch: Any, student: dict[str, Any], teacher: dict[str, Any], targets: list[Target]
) -> Any:
    """Mean over features plus mean over heads of the error relative to the teacher's variance."""
    feature_terms: list[Any] = []
    head_terms: list[Any] = []
    for target in targets:
        s, t = student[target.name], teacher[target.name]
        if target.sigmoid:
            s, t = torch.sigmoid(s), torch.sigmoid(t)
        spread = t.var(dim=(0, 2, 3), keepdim=True).mean() + 1e-8 if t.dim() == 4 else t.var()
        term = ((s - t) ** 2).mean() / (spread + 1e-8)
        (head_terms if target.head else feature_terms).append(term)
    total = torch.stack(head_terms).mean() if head_terms else 0.0
    if feature_terms:
        total = total + torch.stack(feature_terms).mean()
    return total


def distill(
    student: ir.Model,
    teacher: ir.Model,
    images: Sequence[np.ndarray],
    settings: DistillSettings,
    input_name: str | None = None,
) -> DistillResult:
    """Train ``student``'s Conv weights/biases (in place) to match ``teacher`` on ``images``.

    ``images`` are preprocessed model inputs, each (1, C, H, W). The loss is checked before and
    after on the unaugmented images; if training made it worse, the starting weights are kept.
    """
    torch = import_torch()
    started = time.perf_counter()
    if not images:
        raise BadInputError("distillation needs calibration images (calib=DIR)")
    name = input_name or student.graph.inputs[0].name
    assert name is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        torch.manual_seed(settings.seed)
        targets = distill_targets(student.graph, teacher.graph, features=settings.features)
        if not targets:
            raise BadInputError(
                f"model '{student.graph.name}': no Conv output of the pruned model matches the "
                "original's; nothing to distill (set distill_steps=0)"
            )
        wanted = [t.name for t in targets]
        student_graph = TorchGraph(student.graph, trainable=True)
        teacher_graph = TorchGraph(teacher.graph)
        checks = list(images[:_CHECK_IMAGES])
        with torch.no_grad():
            expected_checks = [teacher_graph.run({name: image}, wanted) for image in checks]

        def check_loss() -> float:
            with torch.no_grad():
                losses = [
                    float(_loss(torch, student_graph.run({name: image}, wanted), expected, targets))
                    for image, expected in zip(checks, expected_checks, strict=True)
                ]
            return sum(losses) / len(losses)

        before = check_loss()
        start_weights = student_graph.snapshot()
        parameters = list(student_graph.parameters.values())
        optimizer = torch.optim.Adam(parameters, lr=settings.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(settings.steps, 1), eta_min=settings.lr * 0.05
        )
        views = _Views(images, settings.size, settings.seed, torch)
        running = 0.0
        for step in range(settings.steps):
            batch = views.batch(settings.batch, settings.mosaic)
            with torch.no_grad():
                expected = teacher_graph.run({name: batch}, wanted)
            loss = _loss(torch, student_graph.run({name: batch}, wanted), expected, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            if (step + 1) % 25 == 0:
                logger.info("distill step %d: training loss %.4f", step + 1, running / 25)
                running = 0.0
        after = check_loss()
        kept = after < before
        if not kept:
            student_graph.restore(start_weights)
            after = before
        student_graph.write_back()
        return DistillResult(
            before,
            after,
            settings.steps,
            time.perf_counter() - started,
            len(targets),
            sum(t.head for t in targets),
            kept,
        )
    finally:
        torch.set_num_threads(threads)
