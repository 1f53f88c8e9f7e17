"""Tiny YOLO-style detectors and a recover runner shared by recover's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx import helper

from detc.passes.recover import RecoverOptions, RecoverPass
from tests._models import make_model, value_info

SIZE = 32
F32 = np.float32


def _conv(
    inits: dict, rng: np.random.Generator, name: str, src: str, cin: int, cout: int, stride: int = 1
):
    inits[f"{name}_w"] = rng.normal(0, 0.4, (cout, cin, 3, 3)).astype(F32)
    inits[f"{name}_b"] = rng.normal(0, 0.1, cout).astype(F32)
    return helper.make_node(
        "Conv",
        [src, f"{name}_w", f"{name}_b"],
        [name],
        name=name,
        pads=[1] * 4,
        strides=[stride] * 2,
    )


def tiny_detector(seed: int = 0) -> ir.Model:
    """x (1,3,32,32) -> Conv/SiLU -> Conv/SiLU -> head Conv -> Sigmoid: a YOLO-style raw head."""
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}
    nodes = [
        _conv(inits, rng, "stem", "images", 3, 8, stride=2),
        helper.make_node("Sigmoid", ["stem"], ["stem_sig"], name="stem_sig"),
        helper.make_node("Mul", ["stem", "stem_sig"], ["stem_act"], name="stem_act"),
        _conv(inits, rng, "neck", "stem_act", 8, 8),
        helper.make_node("Sigmoid", ["neck"], ["neck_sig"], name="neck_sig"),
        helper.make_node("Mul", ["neck", "neck_sig"], ["neck_act"], name="neck_act"),
        _conv(inits, rng, "head", "neck_act", 8, 6),
        helper.make_node("Sigmoid", ["head"], ["output0"], name="head_sig"),
    ]
    return make_model(
        nodes,
        [value_info("images", F32, (1, 3, SIZE, SIZE))],
        [value_info("output0", F32, (1, 6, SIZE // 2, SIZE // 2))],
        inits,
    )


def tiny_decoded_detector(seed: int = 0) -> ir.Model:
    """``tiny_detector`` with YOLOv5's decoded output: (1, 256, 6) rows of box, objectness and
    one class score, so the held-out images are judged by their detections."""
    model = tiny_detector(seed)
    graph = model.graph
    head_sigmoid = graph.node("head_sig")
    cells = (SIZE // 2) ** 2
    shape = ir.Value(name="rows_shape", const_value=ir.tensor(np.array([1, 6, cells], np.int64)))
    # boxes in pixels from sigmoids in 0..1 (cx, cy, w, h scaled to the 32-pixel input)
    box_scale = np.array([SIZE, SIZE, SIZE / 2, SIZE / 2, 1, 1], F32).reshape(1, 1, 6)
    scale = ir.Value(name="box_scale", const_value=ir.tensor(box_scale))
    for value in (shape, scale):
        graph.register_initializer(value)
    rows = ir.node("Reshape", [head_sigmoid.outputs[0], shape], name="rows")
    channels_last = ir.node("Transpose", [rows.outputs[0]], attributes={"perm": [0, 2, 1]})
    decoded = ir.node("Mul", [channels_last.outputs[0], scale], name="decoded")
    graph.extend([rows, channels_last, decoded])
    out = decoded.outputs[0]
    out.name, out.shape, out.dtype = "output0", ir.Shape([1, cells, 6]), ir.DataType.FLOAT
    head_sigmoid.outputs[0].name = "head_probabilities"
    graph.outputs[:] = [out]
    return model


def damaged(model: ir.Model, seed: int = 1, noise: float = 0.3) -> ir.Model:
    """``model`` with its Conv weights disturbed: a stand-in for what an approximate pass does."""
    rng = np.random.default_rng(seed)
    out = model.clone()
    for value in out.graph.initializers.values():
        assert value.const_value is not None
        if not (value.name or "").endswith(("_w", "_b")):
            continue  # the decode step's constants are no weights
        array = value.const_value.numpy()
        value.const_value = ir.tensor(
            (array + rng.normal(0, noise * array.std(), array.shape)).astype(F32), name=value.name
        )
    return out


def weights_of(model: ir.Model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}  # type: ignore[union-attr]


def run_recover(student: ir.Model, teacher: Path, images: Path, **options: object) -> RecoverPass:
    settings = dict(
        images=images,
        teacher=teacher,
        max_images=12,
        held_out=4,
        sizes="32",
        block_size=32,
        block_images=8,
        block_steps=5,
        batch=2,
        threads=1,
    )
    settings.update(options)
    recover = RecoverPass(RecoverOptions(**settings))
    recover(student)
    return recover
