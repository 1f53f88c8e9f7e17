"""The compiled letterbox/resize against detc's Python preprocessing (Pillow's bilinear)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from PIL import Image

from detc.compiler.detection.datasets import letterbox_geometry, preprocess
from detc.compiler.detection.spec import ModelSpec
from detc.targets.prepost.letterbox import Preprocessing, letterbox_func, placement

YOLOV5 = ModelSpec(input_size=(64, 96), decoder="yolov5")
YOLOX = ModelSpec(input_size=(64, 96), decoder="yolox")  # BGR, 0..255, top-left
STRETCH = dataclasses.replace(
    YOLOV5, resize="resize", layout="NHWC", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)


def _compiled_placement(prep: Preprocessing, sizes: list[tuple[int, int]]) -> np.ndarray:
    """(new_h, new_w, top, left) per (height, width), from the placement the PrimFuncs use."""
    import tvm
    from tvm.script import tirx as T

    count = len(sizes)
    input_size, letterbox, centre = prep.input_size, prep.letterbox, prep.centre

    # TVM script's buffer annotations are calls, which mypy does not take for types
    @T.prim_func
    def place(
        given: T.Buffer((count, 2), "int64"),  # type: ignore[valid-type]
        out: T.Buffer((count, 4), "int64"),  # type: ignore[valid-type]
    ):
        for i in range(count):
            new_h, new_w, top, left = placement(
                given[i, 0], given[i, 1], input_size, letterbox, centre
            )
            out[i, 0] = new_h
            out[i, 1] = new_w
            out[i, 2] = top
            out[i, 3] = left

    kernel = tvm.compile(place, target=tvm.target.Target({"kind": "llvm"}))
    given = tvm.runtime.tensor(np.asarray(sizes, np.int64))
    out = tvm.runtime.tensor(np.zeros((count, 4), np.int64))
    kernel(given, out)
    return out.numpy()


@pytest.mark.parametrize("spec", [YOLOV5, YOLOX, STRETCH], ids=["centre", "top-left", "resize"])
def test_geometry_is_letterbox_geometry(spec: ModelSpec) -> None:
    prep = Preprocessing.from_spec(spec)
    rng = np.random.default_rng(0)
    sizes = [(64, 96), (1, 1), (480, 640), (640, 480), (63, 97), (1000, 3), (3, 1000)]
    for _ in range(500):
        h, w = rng.integers(1, 3000, 2)
        sizes.append((int(h), int(w)))
    for (height, width), got in zip(sizes, _compiled_placement(prep, sizes), strict=True):
        new_h, new_w, top, left = (int(v) for v in got)
        expected = letterbox_geometry((height, width), spec.input_size, spec)
        if min(new_h, new_w) > 1:  # below: Pillow refuses, we keep one pixel
            assert (top, left) == expected.pad, (height, width)
            # the gain detect.py maps boxes back with: new size / original, in float64
            assert (new_h / height, new_w / width) == expected.gain, (height, width)


def _compiled_preprocess(spec: ModelSpec) -> Any:
    import tvm
    from tvm import relax, tirx

    prep = Preprocessing.from_spec(spec)
    builder = relax.BlockBuilder()
    letterbox = builder.add_func(letterbox_func(prep), "letterbox")
    height, width = tirx.Var("h", "int64"), tirx.Var("w", "int64")
    image = relax.Var("image", relax.TensorType((height, width, 3), "uint8"))
    with builder.function("main", [image]):
        tensor = builder.emit(
            relax.call_tir(letterbox, [image], relax.TensorType(prep.tensor_shape, prep.dtype))
        )
        builder.emit_func_output(tensor)
    executable = tvm.compile(builder.get(), target=tvm.target.Target({"kind": "llvm"}))
    machine = relax.VirtualMachine(executable, tvm.cpu())
    return lambda array: machine["main"](tvm.runtime.tensor(array)).numpy()


#: exactly the input, smaller, odd, portrait, landscape, tiny, large, and heavy shrinks
SIZES = [(64, 96), (37, 53), (500, 333), (20, 20), (63, 97), (1, 1), (30, 1000), (2000, 1500)]


@pytest.mark.parametrize("spec", [YOLOV5, YOLOX, STRETCH], ids=["centre", "top-left", "resize"])
def test_compiled_letterbox_is_pythons_tensor(spec: ModelSpec) -> None:
    run = _compiled_preprocess(spec)
    rng = np.random.default_rng(1)
    for height, width in SIZES:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected, _ = preprocess(Image.fromarray(image), spec)
        np.testing.assert_array_equal(run(image), expected, err_msg=f"{height}x{width}")


def test_shrinking_both_axes_hard_is_within_one_level() -> None:
    """Pillow 13 resamples some strong two-axis shrinks (here 1000x30 → 64x2) so that a few
    pixels differ by one level from its own two-pass algorithm as written: within 1/255."""
    run = _compiled_preprocess(YOLOV5)
    image = np.random.default_rng(0).integers(0, 256, (1000, 30, 3), dtype=np.uint8)
    expected, _ = preprocess(Image.fromarray(image), YOLOV5)
    assert np.abs(run(image) - expected).max() <= 1.0 / 255.0 + 1e-7
