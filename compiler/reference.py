"""onnxruntime as detc's reference: sessions, runs, and seeded random inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from detc.compiler.errors import BadInputError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _numpy_dtype_name(elem_type: int) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def graph_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (initializers excluded) and outputs of a model, with numpy dtype names."""
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims: list[int | str] = []
        for d in tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        return TensorSpec(value.name, tuple(dims), _numpy_dtype_name(tensor_type.elem_type))

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """A self-contained proto: weights a loaded model keeps in external files are read in."""
    if isinstance(model, onnx.ModelProto):
        return model
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        # onnxruntime refuses external paths outside its working directory, and an in-memory
        # session has none: serialise with the bytes inline instead (on a copy).
        model = ir.external_data.load_to_model(model.clone())
    return ir.serde.serialize_model(model)


def ort_session(
    model: ir.Model | onnx.ModelProto | bytes, *, threads: int = 0, optimize: bool = True
):
    """An onnxruntime CPU session. ``threads=0`` lets onnxruntime choose."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # onnxruntime's pool threads spin after each run by default. In an interleaved benchmark
    # they then take the cores from the next contestant (yolov5n at 2 threads: TVM measured
    # 65 ms beside a spinning session, 44 ms beside a quiet one), and onnxruntime itself ran no
    # slower without spinning (38.5 ms vs 42.6 ms in the same runs).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    payload = model if isinstance(model, bytes) else to_proto(model).SerializeToString()
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def run_session(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def random_feeds(inputs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs: floats uniform in [0, 1) (image-like), integers small and non-negative."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        if not spec.is_static():
            raise BadInputError(
                f"input '{spec.name}' has a dynamic shape {list(spec.shape)}: "
                f"make it static with --input-shape {spec.name}:1x3x640x640 (your sizes)"
            )
        shape = tuple(int(d) for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 8, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BadInputError(
                f"input '{spec.name}': dtype {dtype} is not supported for random inputs"
            )
    return feeds


def load_feeds(path: str, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` whose keys are the model's input names."""
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable .npz of input arrays ({exc})") from None
    missing = [s.name for s in inputs if s.name not in feeds]
    if missing:
        raise BadInputError(f"{path}: no array for input(s) {', '.join(missing)}")
    for spec in inputs:
        array = feeds[spec.name]
        fits = array.ndim == len(spec.shape) and all(
            not isinstance(want, int) or want == got
            for want, got in zip(spec.shape, array.shape, strict=True)
        )
        if not fits or array.dtype != np.dtype(spec.dtype):
            raise BadInputError(
                f"{path}: '{spec.name}' is {array.dtype} {list(array.shape)}, the model takes "
                f"{spec.dtype} {list(spec.shape)}"
            )
    return {s.name: feeds[s.name] for s in inputs}
