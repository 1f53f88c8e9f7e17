"""The zoo's ONNX files: each family exported with torch's exporters, and the idioms other
exporters write, made by rewriting those exports.

A :class:`Variant` says how one file is made: the opset, the exporter (TorchScript,
``dynamo=False``, for opsets 11, 13 and 17; ``dynamo=True`` at its native opset 18 — asked for
11 or 13 it writes 18 anyway, and its conversion down to 17 wrote an invalid model for YOLOv8:
Split with opset 18's ``num_outputs``), static or dynamic batch, fp32 or fp16, and at most one
idiom rewrite:

* ``weights-as-inputs``: every initializer also listed as a graph input (older PyTorch exports,
  ``keep_initializers_as_inputs=True``);
* ``value-ints``: 1-D int64 ``Constant(value=...)`` spelled ``Constant(value_ints=...)``, scalars
  ``value_int`` / ``value_float`` (opset 12 onwards);
* ``empty-resize-scales``: ``Resize(x, roi, scales)`` spelled ``Resize(x, roi, [], sizes)`` as
  PyTorch's opset-11 ``interpolate(size=...)`` writes it;
* ``zero-d``: one-element Mul/Add/Sub/Div constants made 0-d tensors.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from tests.zoo.families import build, family

INPUT_NAME = "images"


@dataclass(frozen=True)
class Variant:
    opset: int
    exporter: str = "torchscript"
    dynamic: bool = False
    fp16: bool = False
    idiom: str | None = None

    @property
    def tag(self) -> str:
        parts = [f"op{self.opset}"]
        if self.exporter != "torchscript":
            parts.append(self.exporter)
        if self.dynamic:
            parts.append("dynamic")
        if self.fp16:
            parts.append("fp16")
        if self.idiom:
            parts.append(self.idiom)
        return "-".join(parts)


def export(name: str, variant: Variant, path: Path) -> Path:
    """Export family ``name`` as ``variant`` to ``path``; returns ``path``."""
    spec = family(name)
    model = build(name)
    example = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(0))
    if variant.fp16:
        model, example = model.half(), example.half()
    with torch.no_grad():
        outputs = model(example)
    count = len(outputs) if isinstance(outputs, tuple) else 1
    output_names = [f"output{i}" for i in range(count)]
    dynamic_axes = (
        {n: {0: "batch"} for n in [INPUT_NAME, *output_names]} if variant.dynamic else None
    )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if variant.exporter == "dynamo":
            dynamic_shapes = ({0: torch.export.Dim("batch", max=64)},) if variant.dynamic else None
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=variant.opset,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
            assert program is not None
            program.save(str(path))
        else:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=variant.opset,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                keep_initializers_as_inputs=variant.idiom == "weights-as-inputs",
            )
    if variant.idiom in IDIOM_REWRITES:
        proto = onnx.load(str(path))
        changed = IDIOM_REWRITES[variant.idiom](proto)
        # TorchScript already writes most scalars 0-d: the variant then holds them as exported
        present = variant.idiom == "zero-d" and _zero_d_count(proto) > 0
        assert changed or present, f"{name} {variant.tag}: the idiom rewrite found nothing"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    return path


def _constant_array(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
        return None
    return numpy_helper.to_array(node.attribute[0].t)


def constants_as_value_ints(model: onnx.ModelProto) -> int:
    """``Constant(value=int64[k])`` → ``Constant(value_ints=[...])``; scalars to value_int/float."""
    rewritten = 0
    for node in model.graph.node:
        array = _constant_array(node)
        if array is None:
            continue
        if array.dtype == np.int64 and array.ndim == 1:
            attribute = helper.make_attribute("value_ints", [int(v) for v in array])
        elif array.dtype == np.int64 and array.ndim == 0:
            attribute = helper.make_attribute("value_int", int(array))
        elif array.dtype == np.float32 and array.ndim == 0:
            attribute = helper.make_attribute("value_float", float(array))
        else:
            continue
        del node.attribute[:]
        node.attribute.append(attribute)
        rewritten += 1
    return rewritten


def _first_use(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if name in n.input]


def resize_scales_as_sizes(model: onnx.ModelProto) -> int:
    """``Resize(x, roi, scales)`` with constant scales → ``Resize(x, roi, [], sizes)``."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.input]
    }
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        array = _constant_array(node)
        if array is not None:
            constants[node.output[0]] = array
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Resize" or len(node.input) != 3:
            continue
        scales, shape = constants.get(node.input[2]), shapes.get(node.input[0])
        if scales is None or scales.size == 0 or not shape or 0 in shape:
            continue
        sizes = (np.asarray(shape) * scales).astype(np.int64)
        empty, target = f"{node.name}_empty_scales", f"{node.name}_sizes"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.zeros(0, np.float32), empty),
                numpy_helper.from_array(sizes, target),
            ]
        )
        node.input[2] = empty
        node.input.append(target)
        rewritten += 1
    return rewritten


def scalars_as_zero_d(model: onnx.ModelProto) -> int:
    """One-element constants read only by elementwise arithmetic → 0-d tensors."""
    elementwise = {"Mul", "Add", "Sub", "Div", "Pow"}
    rewritten = 0
    for node in model.graph.node:
        array = _constant_array(node)
        if array is None or array.size != 1 or array.ndim == 0:
            continue
        users = _first_use(model, node.output[0])
        if not users or any(u.op_type not in elementwise for u in users):
            continue
        node.attribute[0].t.CopyFrom(numpy_helper.from_array(array.reshape(()), node.output[0]))
        rewritten += 1
    for initializer in model.graph.initializer:
        if initializer.dims and int(np.prod(initializer.dims)) == 1:
            users = _first_use(model, initializer.name)
            if users and all(u.op_type in elementwise for u in users):
                del initializer.dims[:]
                rewritten += 1
    return rewritten


def _zero_d_count(model: onnx.ModelProto) -> int:
    initializers = sum(1 for i in model.graph.initializer if not i.dims)
    constants = sum(
        1 for n in model.graph.node if (array := _constant_array(n)) is not None and array.ndim == 0
    )
    return initializers + constants


IDIOM_REWRITES = {
    "value-ints": constants_as_value_ints,
    "empty-resize-scales": resize_scales_as_sizes,
    "zero-d": scalars_as_zero_d,
}


class ZooCache:
    """Each (family, variant) exported once per session into ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str, variant: Variant) -> Path:
        path = self.root / f"{name}-{variant.tag}.onnx"
        if not path.exists():
            staging = path.with_suffix(".partial.onnx")
            export(name, variant, staging)
            staging.replace(path)
        return path
