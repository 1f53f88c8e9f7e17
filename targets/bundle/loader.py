"""Run a detc bundle from Python with nothing but numpy and the bundle itself.

This module is standalone on purpose: ``detc package`` copies it into every bundle as
``python/detc_bundle.py``, so a board or GPU machine without detc, TVM or onnx installed can run
and time the model::

    import sys; sys.path.insert(0, "bundle/python")
    import detc_bundle
    model = detc_bundle.load("bundle")            # checks SHA256SUMS, loads the model
    outputs = model(images=array)                 # {name: np.ndarray}
    detections = model.detect(rgb_uint8_hwc)      # --with-nms bundles: boxes in image pixels

``detc.load(BUNDLE)`` returns the same object. It calls the bundle's own C library
(``lib/libdetc_runtime.so``, the C API of ``include/detc_runtime.h``) through ctypes, so Python
runs exactly the code a C or C++ application on the device runs: same integrity check, same
loader, same kernels. The library must be of this machine's architecture (an aarch64 bundle loads
on an aarch64 board, not on the x86 host that packaged it).

Run as a script, it prints the detections of one image (binary PPM) as JSON:
``python3 bundle/python/detc_bundle.py bundle image.ppm``.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LIBRARY = "lib/libdetc_runtime.so"
#: the C API version this loader speaks (detc_runtime.h's DETC_RUNTIME_API_VERSION)
API_VERSION = 2

_STATUS = {
    1: "not a bundle this library reads",
    2: "a file does not match SHA256SUMS",
    3: "bad argument",
    4: "the model failed",
}
#: dtype names of detc_tensor_info → numpy
_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


class BundleError(RuntimeError):
    """A call of the bundle's C library failed; the message is its detc_last_error()."""


class _TensorInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_char_p),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("bytes", ctypes.c_size_t),
    ]


class _Detection(ctypes.Structure):
    _fields_ = [("box", ctypes.c_float * 4), ("score", ctypes.c_float), ("class_id", ctypes.c_int)]


@dataclass(frozen=True)
class TensorSpec:
    """An input or output: name, numpy dtype, shape (-1: free or known only after a run)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Detection:
    """One detection: box x1, y1, x2, y2 in the image's pixels, score, class index and name."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    class_name: str | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON detc-run prints for it."""
        return {"box": list(self.box), "score": self.score, "class": self.class_id}


def _bind(library: ctypes.CDLL) -> None:
    model_p = ctypes.c_void_p
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "detc_open": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(model_p)]),
        "detc_close": (None, [model_p]),
        "detc_last_error": (ctypes.c_char_p, []),
        "detc_num_inputs": (ctypes.c_int, [model_p]),
        "detc_num_outputs": (ctypes.c_int, [model_p]),
        "detc_input_info": (ctypes.c_int, [model_p, ctypes.c_int, ctypes.POINTER(_TensorInfo)]),
        "detc_output_info": (ctypes.c_int, [model_p, ctypes.c_int, ctypes.POINTER(_TensorInfo)]),
        "detc_run": (
            ctypes.c_int,
            [
                model_p,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.c_int,
            ],
        ),
        "detc_output_data": (
            ctypes.c_int,
            [
                model_p,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_size_t),
            ],
        ),
        "detc_runtime_api_version": (ctypes.c_int, []),
        "detc_run_image": (
            ctypes.c_int,
            [model_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int, ctypes.c_int],
        ),
        "detc_detections": (
            ctypes.c_int,
            [model_p, ctypes.POINTER(ctypes.POINTER(_Detection)), ctypes.POINTER(ctypes.c_int)],
        ),
        "detc_num_classes": (ctypes.c_int, [model_p]),
        "detc_class_name": (ctypes.c_char_p, [model_p, ctypes.c_int]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = argtypes


class BundleModel:
    """An open bundle: call it with arrays, or :meth:`detect` on an image; :meth:`close` it
    (or use it as a context manager) to free the model at once."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        library_path = self.directory / LIBRARY
        if not library_path.is_file():
            raise BundleError(f"{self.directory} has no {LIBRARY}: not a detc bundle")
        try:
            self._lib = ctypes.CDLL(str(library_path.resolve()))
        except OSError as err:
            raise BundleError(
                f"{library_path} does not load on this machine ({err}); a bundle runs on the "
                "architecture it was packaged for"
            ) from None
        _bind(self._lib)
        version = self._lib.detc_runtime_api_version()
        if version < API_VERSION:
            raise BundleError(
                f"{library_path} speaks C API version {version}; this loader needs "
                f"{API_VERSION}: package the artifact again with this detc"
            )
        handle = ctypes.c_void_p()
        self._check(self._lib.detc_open(str(self.directory).encode(), ctypes.byref(handle)))
        self._handle: ctypes.c_void_p | None = handle
        self.inputs = [self._info(self._lib.detc_input_info, i) for i in range(self._count(True))]
        self.outputs = [
            self._info(self._lib.detc_output_info, i) for i in range(self._count(False))
        ]
        self.class_names = tuple(
            (self._lib.detc_class_name(handle, i) or b"").decode()
            for i in range(self._lib.detc_num_classes(handle))
        )

    # ---- calls -----------------------------------------------------------------------------

    def __call__(self, *arrays: np.ndarray, **named: np.ndarray) -> dict[str, np.ndarray]:
        """Run once on the inputs (positional in order, or by name); the outputs by name."""
        feeds = self._feeds(arrays, named)
        buffers = (ctypes.c_void_p * len(feeds))(*[a.ctypes.data for a in feeds])
        sizes = (ctypes.c_size_t * len(feeds))(*[a.nbytes for a in feeds])
        self._check(self._lib.detc_run(self._live(), buffers, sizes, len(feeds)))
        return self._outputs()

    def run_image(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        """Run once on a uint8 RGB image (height, width, 3); the outputs by name."""
        image = np.ascontiguousarray(rgb)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BundleError(
                f"an image is uint8 (height, width, 3); got {image.dtype} {image.shape}"
            )
        pointer = image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        height, width = image.shape[:2]
        self._check(self._lib.detc_run_image(self._live(), pointer, height, width))
        return self._outputs()

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """The detections of one image, best first (a bundle compiled with --with-nms)."""
        self.run_image(rgb)
        found = ctypes.POINTER(_Detection)()
        count = ctypes.c_int()
        self._check(
            self._lib.detc_detections(self._live(), ctypes.byref(found), ctypes.byref(count))
        )
        detections = []
        for i in range(count.value):
            entry = found[i]
            class_id = int(entry.class_id)
            name = self.class_names[class_id] if 0 <= class_id < len(self.class_names) else None
            box = (
                float(entry.box[0]),
                float(entry.box[1]),
                float(entry.box[2]),
                float(entry.box[3]),
            )
            detections.append(Detection(box, float(entry.score), class_id, name))
        return detections

    def close(self) -> None:
        if self._handle is not None:
            self._lib.detc_close(self._handle)
            self._handle = None

    def __enter__(self) -> BundleModel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self.close()

    # ---- helpers ---------------------------------------------------------------------------

    def _live(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise BundleError(f"{self.directory}: the model was closed")
        return self._handle

    def _check(self, status: int) -> None:
        if status != 0:
            message = (self._lib.detc_last_error() or b"").decode(errors="replace")
            raise BundleError(message or _STATUS.get(status, f"status {status}"))

    def _count(self, inputs: bool) -> int:
        function = self._lib.detc_num_inputs if inputs else self._lib.detc_num_outputs
        return int(function(self._live()))

    def _info(self, function: Any, index: int) -> TensorSpec:
        info = _TensorInfo()
        self._check(function(self._live(), index, ctypes.byref(info)))
        dtype = info.dtype.decode()
        if dtype not in _DTYPES:
            raise BundleError(f"{self.directory}: tensor dtype {dtype!r} is not one numpy reads")
        shape = tuple(int(info.shape[d]) for d in range(info.ndim))
        return TensorSpec(info.name.decode(), np.dtype(_DTYPES[dtype]), shape)

    def _feeds(
        self, arrays: Sequence[np.ndarray], named: Mapping[str, np.ndarray]
    ) -> list[np.ndarray]:
        if arrays and named:
            raise BundleError("give the inputs either in order or by name, not both")
        if named:
            unknown = set(named) - {spec.name for spec in self.inputs}
            if unknown:
                names = [spec.name for spec in self.inputs]
                raise BundleError(f"no input named {sorted(unknown)[0]!r}; inputs: {names}")
            arrays = [named[spec.name] for spec in self.inputs if spec.name in named]
        if len(arrays) != len(self.inputs):
            raise BundleError(f"the model takes {len(self.inputs)} inputs; got {len(arrays)}")
        feeds = []
        for spec, array in zip(self.inputs, arrays, strict=True):
            value = np.ascontiguousarray(array)
            if value.dtype != spec.dtype:
                raise BundleError(f"input {spec.name!r} is {spec.dtype}; got {value.dtype}")
            feeds.append(value)
        return feeds

    def _outputs(self) -> dict[str, np.ndarray]:
        results: dict[str, np.ndarray] = {}
        handle = self._live()
        for index in range(len(self.outputs)):
            spec = self._info(self._lib.detc_output_info, index)
            data = ctypes.c_void_p()
            size = ctypes.c_size_t()
            self._check(
                self._lib.detc_output_data(handle, index, ctypes.byref(data), ctypes.byref(size))
            )
            raw = ctypes.string_at(data.value, size.value) if data.value and size.value else b""
            results[spec.name] = np.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape).copy()
        return results


def load(directory: str | Path) -> BundleModel:
    """Open the bundle in ``directory`` (its SHA256SUMS checked first)."""
    return BundleModel(directory)


def read_ppm(path: str | Path) -> np.ndarray:
    """A binary PPM (P6, maxval 255) as uint8 (height, width, 3)."""
    data = Path(path).read_bytes()
    fields: list[bytes] = []
    position = 0
    while len(fields) < 4:
        while position < len(data) and data[position : position + 1].isspace():
            position += 1
        if data[position : position + 1] == b"#":
            position = data.find(b"\n", position) + 1 or len(data)
            continue
        end = position
        while end < len(data) and not data[end : end + 1].isspace():
            end += 1
        if end == position:
            raise BundleError(f"{path}: not a binary PPM (P6) image")
        fields.append(data[position:end])
        position = end
    if fields[0] != b"P6" or not all(f.isdigit() for f in fields[1:]) or fields[3] != b"255":
        raise BundleError(f"{path}: not a binary PPM (P6, maxval 255) image")
    width, height = int(fields[1]), int(fields[2])
    pixels = data[position + 1 : position + 1 + width * height * 3]
    if width < 1 or height < 1 or len(pixels) != width * height * 3:
        raise BundleError(f"{path}: its pixel data is truncated")
    return np.frombuffer(pixels, np.uint8).reshape(height, width, 3)


def _main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print("usage: detc_bundle.py BUNDLE_DIR IMAGE.ppm [--runs N]", file=sys.stderr)
        return 2
    runs = int(argv[3]) if len(argv) >= 4 and argv[2] == "--runs" else 0
    try:
        with load(argv[0]) as model:
            image = read_ppm(argv[1])
            found = [d.to_dict() for d in model.detect(image)]
            latencies = []
            for _ in range(runs):
                start = time.perf_counter()
                model.run_image(image)
                latencies.append((time.perf_counter() - start) * 1e3)
    except BundleError as err:
        print(f"detc_bundle: error: {err}", file=sys.stderr)
        return 2
    if runs:  # the shape detc-run prints
        latency = {
            "runs": runs,
            "mean": float(np.mean(latencies)),
            "median": float(np.median(latencies)),
            "min": float(np.min(latencies)),
            "max": float(np.max(latencies)),
        }
        print(json.dumps({"detections": found, "latency_ms": latency}))
    else:
        print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
