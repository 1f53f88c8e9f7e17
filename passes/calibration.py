"""Calibration for the data-aware passes: images in, activations of chosen tensors out.

Images come from a plain folder or a COCO dataset (its ``images/``), preprocessed with the
model's own spec (:func:`detc.compiler.detection.spec.spec_from_onnx`) exactly as evaluation
does, so the statistics describe the inputs the model will really see. Activations are read with
onnxruntime from a *copy* of the model whose chosen intermediate tensors are made extra graph
outputs; the model the pass works on is never touched. Statistics are reduced image by image by
a caller's function, so no more than one image's activations are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.compiler.progress import progress
from detc.compiler.reference import ort_session, run_session, to_proto

Feeds = dict[str, np.ndarray]


def calibration_feeds(
    model: ir.Model | onnx.ModelProto,
    source: str | Path,
    *,
    max_images: int,
    seed: int = 0,
    spec_path: str | Path | None = None,
) -> list[Feeds]:
    """Up to ``max_images`` preprocessed images of ``source``, drawn with ``seed``.

    ``source`` is a folder of images or a COCO dataset folder (images are read from ``images/``).
    The same seed always draws the same images, so passes using them are reproducible.
    Preprocessing follows ``spec_path`` (a model spec JSON/TOML) or, without one, the spec
    inferred from the model (YOLO-style letterbox, RGB, 1/255).
    """
    from detc.compiler.detection.datasets import ImageFolder, load_image, preprocess
    from detc.compiler.detection.spec import spec_for_model

    root = Path(source)
    if not root.is_dir():
        raise BadInputError(f"calibration data {root} is not a folder: give calib=DIR of images")
    if max_images < 1:
        raise BadInputError(f"calibration needs at least one image, got calib_images={max_images}")
    spec = spec_for_model(to_proto(model), spec_path)
    folder = ImageFolder(root)
    rng = np.random.default_rng(seed)
    count = min(max_images, len(folder.paths))
    chosen = sorted(rng.choice(len(folder.paths), size=count, replace=False).tolist())
    feeds = []
    for index in chosen:
        tensor, _ = preprocess(load_image(folder.paths[index]), spec)
        feeds.append({spec.input_name: tensor})
    return feeds


def with_extra_outputs(
    model: ir.Model | onnx.ModelProto, names: Sequence[str], *, only: bool = False
) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the tensors ``names`` (types from shape inference).

    ``only`` makes them the *only* outputs and drops every node they do not depend on, so that
    reading early activations does not pay for the rest of the network.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(to_proto(model))
    wanted = list(dict.fromkeys(names))
    graph = proto.graph
    if only:
        needed = set(wanted)
        kept_nodes = []
        for node in reversed(graph.node):
            if any(o in needed for o in node.output):
                kept_nodes.append(node)
                needed.update(i for i in node.input if i)
        del graph.node[:]
        graph.node.extend(reversed(kept_nodes))
        del graph.output[:]
        initializers = [t for t in graph.initializer if t.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
    existing = {o.name for o in graph.output}
    missing = [n for n in wanted if n not in existing]
    if not missing:
        return proto
    inferred = onnx.shape_inference.infer_shapes(proto)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input]}
    for name in missing:
        info = known.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            raise BadInputError(
                f"calibration cannot read tensor '{name}': ONNX shape inference gives it no type "
                "(is it produced by a custom op?)"
            )
        graph.output.add().CopyFrom(info)
    return proto


def collect(
    model: ir.Model | onnx.ModelProto,
    names: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    visit: Callable[[int, dict[str, np.ndarray]], None],
    *,
    threads: int = 0,
    desc: str = "calibration: activations",
) -> None:
    """Run ``model`` on each of ``feeds`` and call ``visit(index, {name: activation})``.

    Only the part of the model that computes ``names`` runs; ``desc`` names the step in progress
    lines.
    """
    session = ort_session(with_extra_outputs(model, names, only=True), threads=threads)
    wanted = list(dict.fromkeys(names))
    for index, feed in enumerate(progress(feeds, desc, "image")):
        needed = {i.name for i in session.get_inputs()}
        outputs = run_session(session, {k: v for k, v in feed.items() if k in needed})
        visit(index, {name: outputs[name] for name in wanted})


# --- convolution geometry and patches ----------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Where a 2-D Conv reads its input: what turns activations into im2col patches."""

    in_size: tuple[int, int]  # (H, W) of the input
    out_size: tuple[int, int]  # (H, W) of the output
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right

    @property
    def out_pixels(self) -> int:
        return self.out_size[0] * self.out_size[1]


def _static_dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = list(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


def _auto_pads(mode: str, size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    if mode in ("", "NOTSET", "VALID"):
        return 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small = total // 2
    return (small, total - small) if mode == "SAME_UPPER" else (total - small, small)


def static_facts(model: ir.Model) -> tuple[dict[ir.Node, ConvGeometry], dict[ir.Node, int]]:
    """Geometry of every 2-D Conv and MACs of every node, from shape inference on a copy.

    Keyed by the nodes of ``model`` itself (a clone keeps node order, so the two walk in step).
    """
    import onnx_ir.passes.common as common_passes

    from detc.compiler.ir.stats import node_macs

    clone = model.clone()
    common_passes.ShapeInferencePass()(clone)
    geometry: dict[ir.Node, ConvGeometry] = {}
    macs: dict[ir.Node, int] = {}
    for node, twin in zip(model.graph, clone.graph, strict=True):
        macs[node] = node_macs(twin)
        if twin.op_type != "Conv" or len(twin.inputs) < 2:
            continue
        x = _static_dims(twin.inputs[0])
        y = _static_dims(twin.outputs[0])
        w = _static_dims(twin.inputs[1])
        if x is None or y is None or w is None or len(w) != 4 or len(x) != 4:
            continue
        kernel = (w[2], w[3])
        sh, sw = twin.attributes.get_ints("strides", (1, 1))
        dh, dw = twin.attributes.get_ints("dilations", (1, 1))
        mode = twin.attributes.get_string("auto_pad", "NOTSET")
        if mode in ("", "NOTSET"):
            top, left, bottom, right = twin.attributes.get_ints("pads", (0, 0, 0, 0))
        else:
            top, bottom = _auto_pads(mode, x[2], kernel[0], sh, dh)
            left, right = _auto_pads(mode, x[3], kernel[1], sw, dw)
        geometry[node] = ConvGeometry(
            (x[2], x[3]), (y[2], y[3]), kernel, (sh, sw), (dh, dw), (top, left, bottom, right)
        )
    return geometry, macs


def sample_positions(geometry: ConvGeometry, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct output pixels (flat indices) of a Conv, or all of them if fewer."""
    total = geometry.out_pixels
    if total <= count:
        return np.arange(total)
    return np.sort(rng.choice(total, size=count, replace=False))


def extract_patches(x: np.ndarray, geometry: ConvGeometry, positions: np.ndarray) -> np.ndarray:
    """im2col rows of image 0 of ``x`` (1, C, H, W) at output pixels ``positions``: (P, C*kh*kw).

    Column order is the Conv weight's, ``weight.reshape(out_channels, -1)``: channel, row, col.
    """
    top, left, bottom, right = geometry.pads
    padded = np.pad(x[0], ((0, 0), (top, bottom), (left, right)))
    out_w = geometry.out_size[1]
    oy, ox = np.divmod(positions, out_w)
    kh, kw = geometry.kernel
    rows = oy[:, None] * geometry.strides[0] + np.arange(kh)[None, :] * geometry.dilations[0]
    cols = ox[:, None] * geometry.strides[1] + np.arange(kw)[None, :] * geometry.dilations[1]
    patches = padded[:, rows[:, :, None], cols[:, None, :]]  # (C, P, kh, kw)
    return np.ascontiguousarray(patches.transpose(1, 0, 2, 3)).reshape(len(positions), -1)
