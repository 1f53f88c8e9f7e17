"""Reading an artifact directory back: manifest.json parsed into a typed, checked
:class:`Manifest`, and :class:`Artifact`, the one way every reader (runtime, emulator, RPC,
verification) opens an artifact.

An artifact is input like any other. :meth:`Artifact.open` checks the manifest once: format,
version, fields and their types, tensor shapes and sizes (inputs over :data:`MAX_INPUT_BYTES` are
refused before anything allocates them), every file it names a plain file inside the directory
once symlinks are resolved, and a sha256 for every file detc loads. :meth:`Artifact.library_copy`
is the only way to the library: a private copy whose sha256 matched the manifest's, so the file
loaded is the file checked. :meth:`Artifact.load_params` checks params.npz's headers before numpy
allocates what they declare. :func:`read_manifest` is the same check returning the JSON.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import file_sha256 as sha256_of
from detc.compiler.reference import TensorSpec
from detc.targets.context import (
    IMAGE_INPUT_SHAPE,
    LIBRARY_FILE,
    MANIFEST_FILE,
    PARAMS_FILE,
    param_key,
)
from detc.targets.target import Target, resolve_target

FORMAT = "detc-artifact"
FORMAT_VERSION = 1
#: the calling conventions of ``main``: graph inputs then params.npz, or inputs only
CALLING_CONVENTIONS = ("inputs+params", "inputs")
#: the manifest keys every reader needs
_REQUIRED_FIELDS = (
    "target",
    "library",
    "library_sha256",
    "params",
    "calling_convention",
    "inputs",
    "outputs",
)
#: a sha256 as the manifest writes it
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: the most bytes an artifact's inputs may take together: a manifest stating more is refused
#: before anything allocates them (a batch of 32 640x640 RGB float images is 157 MB)
MAX_INPUT_BYTES = 4 * 1024**3
#: the most bytes params.npz may unpack to, and how much a member may be compressed (np.savez
#: stores them uncompressed)
MAX_PARAMS_BYTES = 8 * 1024**3
_MAX_PARAMS_COMPRESSION = 100


def tensor_bytes(shape: Any, dtype: np.dtype) -> int:
    """Bytes of a tensor of ``shape`` (whole sizes) and ``dtype``."""
    size = int(dtype.itemsize)
    for dim in shape:
        size *= int(dim)
    return size


def _malformed(path: Path, what: str) -> BadInputError:
    return BadInputError(f"{path} has a malformed {what}; re-run detc compile")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dtype(value: object, path: Path, what: str) -> np.dtype:
    try:
        dtype = np.dtype(str(value)) if isinstance(value, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf" or dtype.name != value:
        raise _malformed(path, f"{what} (dtype {value!r})")
    return dtype


def _tensor_specs(
    values: Any, what: str, path: Path, *, image_input: bool = False
) -> tuple[TensorSpec, ...]:
    """The manifest's ``inputs`` / ``outputs``. An input's dimensions are whole sizes of at least
    1 (an artifact is compiled for one shape); an output's may also be symbolic. The one
    exception: the image input of an artifact with compiled preprocessing (``image_input``),
    whose height and width are the free sizes ``"h"`` and ``"w"``."""
    if not isinstance(values, list) or not all(
        isinstance(v, dict) and {"name", "shape", "dtype"} <= set(v) for v in values
    ):
        raise _malformed(path, f"'{what}' list")
    specs = []
    for value in values:
        name, shape = value["name"], value["shape"]
        if not isinstance(name, str) or not isinstance(shape, list):
            raise _malformed(path, f"'{what}' entry ({str(name)[:40]!r})")
        fixed = all(_is_int(d) and d >= 1 for d in shape)
        loose = all((_is_int(d) and d >= 0) or d is None or isinstance(d, str) for d in shape)
        if image_input:
            fixed = shape == list(IMAGE_INPUT_SHAPE) and value["dtype"] == "uint8"
        if not (fixed if what == "inputs" else loose):
            raise _malformed(path, f"shape for '{name}' ({str(shape)[:60]})")
        _dtype(value["dtype"], path, f"'{what}' entry '{name}'")
        specs.append(TensorSpec(name, tuple(shape), value["dtype"]))
    return tuple(specs)


def _check_input_bytes(inputs: tuple[TensorSpec, ...], path: Path) -> None:
    total = sum(
        tensor_bytes(spec.shape, np.dtype(spec.dtype))
        for spec in inputs
        if all(_is_int(d) for d in spec.shape)  # an image of any size is checked when run
    )
    if total > MAX_INPUT_BYTES:
        raise BadInputError(
            f"{path}: the inputs take {total:,} bytes, over detc's {MAX_INPUT_BYTES:,}-byte "
            "limit; re-run detc compile"
        )


def _digest(value: object, path: Path, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise BadInputError(
            f"{path} has no valid sha256 for {what} (detc checks every file it loads against "
            "the manifest); re-run detc compile"
        )
    return value


def _named_files(document: Mapping[str, Any], path: Path) -> dict[str, tuple[str, str]]:
    """Every file besides the library and params that the manifest names, as
    {what: (file name, sha256)}: the float reference model, the quantized reference, and the
    transformed graph of a pruned or factorized build."""
    named: dict[str, tuple[str, str]] = {}
    for key in ("source", "quantization", "approximate", "model_spec", "metadata"):
        if not isinstance(document.get(key, {}), (dict, type(None))):
            raise _malformed(path, f"'{key}'")
    source = document.get("source") or {}
    if source.get("onnx") is not None:
        if not isinstance(source["onnx"], str):
            raise _malformed(path, "'source'")
        digest = _digest(source.get("onnx_sha256"), path, "source.onnx")
        named["source.onnx"] = (source["onnx"], digest)
    quantization = document.get("quantization") or {}
    if quantization.get("mode") == "int8":
        reference = quantization.get("reference")
        if not isinstance(reference, dict) or not isinstance(reference.get("file"), str):
            raise _malformed(path, "'quantization.reference'")
        named["quantization.reference"] = (
            reference["file"],
            _digest(reference.get("sha256"), path, "quantization.reference"),
        )
    approximate = document.get("approximate") or {}
    if approximate:
        reference = approximate.get("reference")
        if not isinstance(reference, dict) or not isinstance(reference.get("file"), str):
            raise _malformed(path, "'approximate.reference'")
        named["approximate.reference"] = (
            reference["file"],
            _digest(reference.get("sha256"), path, "approximate.reference"),
        )
    return named


@dataclass(frozen=True)
class PrepostEntry:
    """The manifest's ``prepost``: which stages the library does around the network."""

    preprocess: bool  # takes a uint8 (h, w, 3) RGB image of any size
    nms: bool  # returns boxes, scores, classes, count
    max_detections: int
    input_size: tuple[int, int]  # the network's (H, W)


@dataclass(frozen=True)
class Manifest:
    """manifest.json, parsed and checked: what every reader of an artifact relies on."""

    path: Path  # the manifest.json it was read from (named in messages)
    format: str
    format_version: int
    target: Mapping[str, Any]  # name, machine, tvm_target, host_cpu
    library: str  # file name inside the artifact directory
    library_sha256: str
    params_file: str
    params_count: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    calling_convention: str  # one of CALLING_CONVENTIONS
    #: the other files the manifest names, {what: (file name, sha256)} (see :func:`_named_files`)
    files: Mapping[str, tuple[str, str]]
    #: every other field as written (tuning, precision, build, versions, the caller's fields)
    other: Mapping[str, Any]
    document: Mapping[str, Any] = field(repr=False, compare=False)
    #: compiled pre/post-processing (None: the library is the network alone)
    prepost: PrepostEntry | None = None

    @classmethod
    def parse(cls, document: object, path: Path) -> Manifest:
        """Check ``document`` (the JSON of ``path``); BadInputError saying what is wrong."""
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise BadInputError(f"{path} is not a {FORMAT} manifest; re-run detc compile")
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise BadInputError(
                f"{path} has format_version {version!r}; this detc reads {FORMAT_VERSION}: "
                "re-run detc compile"
            )
        for key in _REQUIRED_FIELDS:
            if key not in document:
                raise BadInputError(f"{path} lacks '{key}'; re-run detc compile")
        target, params, library = document["target"], document["params"], document["library"]
        if not isinstance(target, dict) or not isinstance(target.get("name", ""), str):
            raise _malformed(path, "'target'")
        if not isinstance(target.get("tvm_target", {}), dict):
            raise _malformed(path, "'target.tvm_target'")
        if not isinstance(library, str):
            raise _malformed(path, "'library'")
        digest = _digest(document["library_sha256"], path, f"the library {library!r}")
        if not (
            isinstance(params, dict)
            and isinstance(params.get("file", PARAMS_FILE), str)
            and _is_int(params.get("count", 0))
            and params.get("count", 0) >= 0
        ):
            raise _malformed(path, "'params'")
        convention = document["calling_convention"]
        if convention not in CALLING_CONVENTIONS:
            raise BadInputError(
                f"{path}: unknown calling_convention {convention!r}; re-run detc compile"
            )
        prepost = _prepost(document, path)
        image_input = prepost is not None and prepost.preprocess
        inputs = _tensor_specs(document["inputs"], "inputs", path, image_input=image_input)
        _check_input_bytes(inputs, path)
        typed = {"format", "format_version", "prepost", *_REQUIRED_FIELDS}
        return cls(
            path=path,
            format=FORMAT,
            format_version=FORMAT_VERSION,
            target=target,
            library=library,
            library_sha256=digest,
            params_file=params.get("file", PARAMS_FILE),
            params_count=params.get("count", 0),
            inputs=inputs,
            outputs=_tensor_specs(document["outputs"], "outputs", path),
            calling_convention=convention,
            files=_named_files(document, path),
            other={k: v for k, v in document.items() if k not in typed},
            document=document,
            prepost=prepost,
        )

    @property
    def target_name(self) -> str:
        return str(self.target.get("name", "?"))

    @property
    def tvm_target(self) -> Mapping[str, Any]:
        found = self.target.get("tvm_target")
        return found if isinstance(found, dict) else {}

    @property
    def takes_params(self) -> bool:
        """Whether ``main`` takes params.npz after the inputs (else its weights are constants)."""
        return self.calling_convention == "inputs+params"

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def as_dict(self) -> dict[str, Any]:
        """The manifest as written (a copy the caller may change)."""
        return copy.deepcopy(dict(self.document))

    def ordered_inputs(self, feeds: Mapping[str, np.ndarray], set_index: int) -> list[np.ndarray]:
        """``feeds`` (one feed set, by input name) as main's inputs in order, contiguous;
        BadInputError naming the feed set and input when one is missing, unknown or mistyped."""
        names = self.input_names
        unknown = sorted(set(feeds) - set(names))
        if unknown:
            raise BadInputError(
                f"feed set {set_index}: unknown input '{unknown[0]}'; the artifact takes {names}"
            )
        ordered = []
        for spec in self.inputs:
            if spec.name not in feeds:
                raise BadInputError(
                    f"feed set {set_index} lacks input '{spec.name}' (artifact takes {names})"
                )
            value = contiguous(feeds[spec.name])
            expected_dtype = np.dtype(spec.dtype)
            if value.dtype != expected_dtype:
                raise BadInputError(
                    f"feed set {set_index}: input '{spec.name}' is {value.dtype}, the artifact "
                    f"takes {expected_dtype}"
                )
            shape = list(spec.shape)
            if len(shape) != value.ndim or any(
                isinstance(d, int) and d != actual
                for d, actual in zip(shape, value.shape, strict=True)
            ):
                raise BadInputError(
                    f"feed set {set_index}: input '{spec.name}' has shape {list(value.shape)}, "
                    f"the artifact takes {shape}"
                )
            ordered.append(value)
        return ordered


def contiguous(value: Any) -> np.ndarray:
    """``value`` as a C-contiguous array of the same shape. Not ``np.ascontiguousarray``: that
    turns a 0-d array (a scalar parameter or input) into shape (1,), which the library refuses."""
    return np.asarray(value, order="C")


def _inside(directory: Path, name: str, key: str, manifest_path: Path) -> Path:
    """``directory / name``, a regular file (or absent) inside ``directory`` once symlinks are
    resolved; BadInputError for a name that is absolute, leads out, or is not a plain file."""
    path = directory / name
    if (
        not name
        or "\x00" in name
        or Path(name).is_absolute()
        or not path.resolve().is_relative_to(directory.resolve())
        or path.resolve() == directory.resolve()
    ):
        raise BadInputError(
            f"{manifest_path}: '{key}' is {name!r}, not a file inside {directory}; "
            "re-run detc compile"
        )
    if path.exists() and not path.resolve().is_file():
        raise BadInputError(f"{path} is not a regular file; re-run detc compile")
    return path


def _copy_checked(source: Path, destination: Path, expected: str, described: str) -> None:
    """Copy ``source`` to ``destination``, hashing what is copied; BadInputError (and nothing
    left at ``destination``) when its sha256 is not ``expected``."""
    digest = hashlib.sha256()
    try:
        with source.open("rb") as reader, destination.open("wb") as writer:
            for block in iter(lambda: reader.read(1 << 20), b""):
                digest.update(block)
                writer.write(block)
    except FileNotFoundError:
        raise BadInputError(f"{source} is missing; re-run detc compile") from None
    if digest.hexdigest() != expected:
        destination.unlink(missing_ok=True)
        raise BadInputError(
            f"{source} does not match its manifest ({described}: corrupt or replaced); "
            "re-run detc compile"
        )


@dataclass(frozen=True)
class Artifact:
    """An artifact directory whose manifest was read and checked: :meth:`open` it."""

    directory: Path
    manifest: Manifest

    @classmethod
    def open(cls, directory: Path | str) -> Artifact:
        """The artifact in ``directory``: manifest.json readable, a JSON object of this format
        and version with every field readers need, its file names inside the directory, the
        library present. BadInputError saying what is wrong (and to re-run detc compile)."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise BadInputError(
                f"artifact directory {directory} does not exist; re-run detc compile"
            )
        try:
            if path.stat().st_size > _MAX_MANIFEST_BYTES:
                raise BadInputError(f"{path} is too large to be a manifest; re-run detc compile")
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"{path} is missing; re-run detc compile") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise BadInputError(
                f"{path} is unreadable or corrupt ({err}); re-run detc compile"
            ) from err
        manifest = Manifest.parse(document, path)
        artifact = cls(directory, manifest)
        _inside(directory, manifest.params_file, "params", path)
        for what, (name, _) in manifest.files.items():
            _inside(directory, name, what, path)
        if not _inside(directory, manifest.library, "library", path).is_file():
            raise BadInputError(f"{artifact.library_path} is missing; re-run detc compile")
        return artifact

    @property
    def manifest_path(self) -> Path:
        return self.manifest.path

    @property
    def library_path(self) -> Path:
        return self.directory / self.manifest.library

    @property
    def params_path(self) -> Path:
        return self.directory / self.manifest.params_file

    def target(self) -> Target:
        """The target the artifact was built for (e.g. for :meth:`Target.device`)."""
        return resolve_target(self.manifest.target_name)

    def check_library_digest(self) -> None:
        """BadInputError when model.so is not the library the manifest describes."""
        if sha256_of(self.library_path) != self.manifest.library_sha256:
            raise BadInputError(
                f"{self.library_path} does not match its manifest (corrupt or replaced); "
                "re-run detc compile"
            )

    @contextmanager
    def library_copy(self) -> Iterator[Path]:
        """A private copy of the library whose sha256 matches the manifest's, for loading or
        uploading: the file loaded is the file checked, whatever happens to the artifact folder
        meanwhile. Removed on exit (a library already loaded stays mapped)."""
        with tempfile.TemporaryDirectory(prefix="detc-library-") as private:
            copy_path = Path(private) / LIBRARY_FILE
            _copy_checked(
                self.library_path, copy_path, self.manifest.library_sha256, "library_sha256"
            )
            yield copy_path

    def checked_file(self, what: str) -> Path | None:
        """The file the manifest names as ``what`` ("source.onnx", "quantization.reference"),
        after checking its sha256 against the manifest; None when the manifest names none."""
        if what not in self.manifest.files:
            return None
        name, expected = self.manifest.files[what]
        path = self.directory / name
        if not path.is_file():
            raise BadInputError(f"{path} is missing; re-run detc compile")
        if sha256_of(path) != expected:
            raise BadInputError(
                f"{path} does not match its manifest ({what}: corrupt or replaced); "
                "re-run detc compile"
            )
        return path

    def reference_model(self) -> Path | None:
        """The float model the artifact was compiled from, as ONNX, kept inside the artifact
        (``reference.onnx``) and checked against its sha256; None for an artifact without one."""
        return self.checked_file("source.onnx")

    def load_params(self) -> list[np.ndarray]:
        """main()'s parameters after the inputs, in order ([] when it takes none)."""
        count = self.manifest.params_count
        if not self.manifest.takes_params or count == 0:
            return []
        path = self.params_path
        keys = [param_key(i) for i in range(count)]
        try:
            _check_params_archive(path, keys)
            with np.load(path, allow_pickle=False) as archive:
                return [contiguous(archive[key]) for key in keys]
        except FileNotFoundError:
            raise BadInputError(f"{path} is missing; re-run detc compile") from None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise BadInputError(
                f"{path} is unreadable or corrupt ({err}); re-run detc compile"
            ) from err


def _prepost(document: Mapping[str, Any], path: Path) -> PrepostEntry | None:
    """The manifest's ``prepost`` key (compiled pre/post-processing), checked; None without."""
    entry = document.get("prepost")
    if entry is None:
        return None
    size = entry.get("input_size") if isinstance(entry, dict) else None
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("preprocess"), bool)
        and isinstance(entry.get("nms"), bool)
        and _is_int(entry.get("max_detections"))
        and entry["max_detections"] >= 1
        and isinstance(size, list)
        and len(size) == 2
        and all(_is_int(d) and d >= 1 for d in size)
    ):
        raise _malformed(path, "'prepost'")
    return PrepostEntry(
        preprocess=entry["preprocess"],
        nms=entry["nms"],
        max_detections=entry["max_detections"],
        input_size=(size[0], size[1]),
    )


#: manifests detc writes are a few kB (a big int8 model's kept-float list: tens of kB)
_MAX_MANIFEST_BYTES = 16 * 1024**2


#: the .npy format versions np.savez writes
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _check_params_archive(path: Path, keys: list[str]) -> None:
    """Before numpy reads params.npz: every key present, the unpacked sizes within
    :data:`MAX_PARAMS_BYTES`, no member compressed like a zip bomb, and each array's declared
    shape no bigger than its data (numpy would allocate what the header declares)."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
        total = 0
        for key in keys:
            info = members.get(f"{key}.npy")
            if info is None:
                raise BadInputError(
                    f"{path} lacks {key} ({len(keys)} params expected); re-run detc compile"
                )
            total += info.file_size
            ratio = info.file_size / max(info.compress_size, 1)
            if total > MAX_PARAMS_BYTES or ratio > _MAX_PARAMS_COMPRESSION:
                raise BadInputError(
                    f"{path}: {key} unpacks to {info.file_size:,} bytes (compressed "
                    f"{info.compress_size:,}); refused as corrupt or hostile, re-run detc compile"
                )
            with archive.open(info) as member:
                read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(member))
                if read_header is None:
                    raise BadInputError(f"{path}: {key} is not a .npy array; re-run detc compile")
                shape, _, dtype = read_header(member)
                if dtype.hasobject or tensor_bytes(shape, dtype) > info.file_size:
                    raise BadInputError(
                        f"{path}: {key} declares {shape} {dtype}, more than its data; "
                        "re-run detc compile"
                    )


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of the artifact in ``out_dir``, checked (:meth:`Artifact.open`), as JSON;
    BadInputError saying what is wrong."""
    return Artifact.open(out_dir).manifest.as_dict()
