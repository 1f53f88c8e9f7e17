"""The artifact directory: building it atomically, and reading its manifest back.

    <out_dir>/manifest.json   what was built, for what, from what (format "detc-artifact" v1)
    <out_dir>/model.so        the Relax VM executable (``export_library``)
    <out_dir>/params.npz      main()'s parameters after the inputs: p00000, p00001, …
    <out_dir>/reference_qdq.onnx  int8 artifacts only: the quantized model as QDQ ONNX, which
                              ``detc verify`` runs in onnxruntime as the quantized reference
    <out_dir>/report/         written later by ``detc verify --data`` (replaced by a rebuild)

The directory is built under a hidden temporary name beside ``out_dir`` and renamed into place
only when every phase has succeeded, so a failed or interrupted build leaves neither a
half-written ``out_dir`` nor the temporary directory, and an existing artifact survives it.

Every reader goes through :meth:`Artifact.open`, which parses manifest.json into a typed
:class:`Manifest` and checks it once (format, version, required fields, file names inside the
directory, the library present); :func:`read_manifest` is the same check returning the JSON.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import replace_directory, write_text_atomically
from detc.compiler.reference import TensorSpec
from detc.targets.context import (
    LIBRARY_FILE,
    MANIFEST_FILE,
    PARAMS_FILE,
    BuildContext,
    param_key,
)
from detc.targets.target import Target, resolve_target, run_phases
from detc.targets.tuning.options import TuningOptions

logger = logging.getLogger("detc.targets")

FORMAT = "detc-artifact"
FORMAT_VERSION = 1
#: the manifest keys this module writes; callers' ``manifest_fields`` may not override them
OWNED_FIELDS = frozenset(
    {
        "format",
        "format_version",
        "target",
        "library",
        "params",
        "calling_convention",
        "inputs",
        "outputs",
        "tuning",
        "precision",
        "build",
        "versions",
        "library_sha256",
        "built_at",
    }
)
QUANTIZED_REFERENCE_FILE = "reference_qdq.onnx"
#: the float model as detc exported it, kept when the source was not an ONNX file (a torch
#: module or ``.pt2``): onnxruntime, which ``detc verify`` and ``bench`` compare with, reads ONNX
SOURCE_REFERENCE_FILE = "reference.onnx"
#: what ``detc verify --data`` writes into the artifact by default
REPORT_DIR = "report"
#: files ``build_artifact(extra_files=...)`` may add beside the library
EXTRA_FILES = frozenset({QUANTIZED_REFERENCE_FILE, SOURCE_REFERENCE_FILE})
_ARTIFACT_FILES = frozenset({MANIFEST_FILE, LIBRARY_FILE, PARAMS_FILE, REPORT_DIR}) | EXTRA_FILES
#: the calling conventions of ``main``: graph inputs then params.npz, or inputs only
CALLING_CONVENTIONS = ("inputs+params", "inputs")
#: the manifest keys every reader needs
_REQUIRED_FIELDS = ("target", "library", "params", "calling_convention", "inputs", "outputs")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _value_specs(values: Any, skip: set[str]) -> list[dict[str, Any]]:
    specs = []
    for value in values:
        if value.name in skip:
            continue
        tensor_type = value.type.tensor_type
        shape: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        specs.append({"name": value.name, "shape": shape, "dtype": np.dtype(dtype).name})
    return specs


def graph_io(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as [{"name","shape","dtype"}]; initializers listed as inputs skipped."""
    initializers = {t.name for t in model.graph.initializer}
    return _value_specs(model.graph.input, initializers), _value_specs(model.graph.output, set())


def _versions() -> dict[str, str]:
    import tvm
    import tvm_ffi

    return {
        "tvm": tvm.__version__,
        "tvm_ffi": tvm_ffi.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }


def _looks_like_artifact(directory: Path) -> bool:
    entries = {p.name for p in directory.iterdir()}
    return not entries or (MANIFEST_FILE in entries and entries <= _ARTIFACT_FILES)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but a previous artifact (or an empty directory)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise BadInputError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and not _looks_like_artifact(out_dir):
        raise BadInputError(
            f"{out_dir} exists and is not a detc artifact (it holds other files); "
            "choose another output path or remove it"
        )


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def build_artifact(
    model: onnx.ModelProto,
    target: str,
    out_dir: Path,
    *,
    manifest_fields: Mapping[str, Any],
    num_threads: int | None = None,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    tuning: TuningOptions | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """Compile ``model`` for ``target`` ("x86", "x86:<mcpu>", …) into the directory ``out_dir``.

    Returns the manifest written to ``out_dir/manifest.json``. Progress lines (one per phase,
    only when ``progress``) and notices such as "untuned build" (always) go to ``report`` when
    given, else to the ``detc.targets`` logger (INFO / WARNING). ``num_threads`` is the core
    count the code is built for (``num-cores``; default: this machine's physical cores).
    ``tuning`` (:class:`~detc.targets.tuning.options.TuningOptions`) selects the target's tuned
    pipeline (:meth:`Target.pipeline_for`): tuning database, optionally a search, and on x86 the
    blocked layout with weights bound as constants.
    ``extra_files`` (name → content, names from :data:`EXTRA_FILES`) are written into the
    artifact with the rest, under the same all-or-nothing rename.
    """
    clash = OWNED_FIELDS & set(manifest_fields)
    if clash:
        raise ValueError(f"manifest_fields may not set {sorted(clash)}: build_artifact owns them")
    unknown = set(extra_files or {}) - EXTRA_FILES
    if unknown:
        raise ValueError(f"extra_files {sorted(unknown)}: the artifact layout has no such files")
    chosen = resolve_target(target)
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    chosen.check_toolchain()
    threads = num_threads if num_threads is not None else chosen.default_num_threads()
    if threads < 1:
        raise BadInputError(f"num_threads must be at least 1, got {threads}")

    def progress_line(message: str) -> None:
        if not progress:
            logger.debug("%s", message)
        elif report is not None:
            report(message)
        else:
            logger.info("%s", message)

    def notice(message: str) -> None:
        if report is not None:
            report(message)
        else:
            logger.warning("%s", message)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o777 & ~_current_umask())  # mkdtemp makes it private (0700)
    started = time.perf_counter()
    try:
        context = BuildContext(
            model=model,
            staging_dir=staging,
            num_threads=threads,
            progress=progress_line,
            warn=notice,
            tuning=tuning,
            pipeline=chosen.pipeline_for(tuning),
        )
        run_phases(chosen, context)
        inputs, outputs = graph_io(model)
        if len(inputs) != context.num_inputs:
            raise BadInputError(
                f"the model lists {len(inputs)} graph inputs but TVM imported "
                f"{context.num_inputs}; check the model's inputs and initializers"
            )
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "target": {
                "name": chosen.name,
                "machine": chosen.machine,
                "tvm_target": json.loads(str(context.tvm_target)),
                "host_cpu": chosen.host_cpu(),
            },
            "library": LIBRARY_FILE,
            "params": {"file": PARAMS_FILE, "count": len(context.params)},
            "calling_convention": context.manifest.get("calling_convention", "inputs+params"),
            "inputs": inputs,
            "outputs": outputs,
            "tuning": context.manifest["tuning"],
            "precision": context.manifest.get("precision"),
            "build": {
                "seconds": round(time.perf_counter() - started, 3),
                "num_threads": threads,
                "phases": [
                    {"name": name, "seconds": round(seconds, 3), "summary": summary}
                    for name, seconds, summary in context.timings
                ],
            },
            "versions": _versions(),
            "library_sha256": sha256_of(staging / LIBRARY_FILE),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **manifest_fields,
        }
        for name, content in (extra_files or {}).items():
            (staging / name).write_bytes(content)
        write_text_atomically(staging / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        # an existing artifact is replaced only now, when everything is in place
        replace_directory(staging, out_dir)
    except BaseException:
        # Ctrl-C included: the staging directory must not outlive a failed build.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# ---- reading ------------------------------------------------------------------------------


def _tensor_specs(values: Any, what: str, path: Path) -> tuple[TensorSpec, ...]:
    if not isinstance(values, list) or not all(
        isinstance(v, dict) and {"name", "shape", "dtype"} <= set(v) for v in values
    ):
        raise BadInputError(f"{path} has a malformed '{what}' list; re-run detc compile")
    return tuple(TensorSpec(str(v["name"]), tuple(v["shape"]), str(v["dtype"])) for v in values)


@dataclass(frozen=True)
class Manifest:
    """manifest.json, parsed and checked: what every reader of an artifact relies on."""

    path: Path  # the manifest.json it was read from (named in messages)
    format: str
    format_version: int
    target: Mapping[str, Any]  # name, machine, tvm_target, host_cpu
    library: str  # file name inside the artifact directory
    library_sha256: str | None
    params_file: str
    params_count: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    calling_convention: str  # one of CALLING_CONVENTIONS
    #: every other field as written (tuning, precision, build, versions, the caller's fields)
    other: Mapping[str, Any]
    document: Mapping[str, Any] = field(repr=False, compare=False)

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
        target, params = document["target"], document["params"]
        library, digest = document["library"], document.get("library_sha256")
        if not isinstance(target, dict) or not isinstance(target.get("name", ""), str):
            raise BadInputError(f"{path} has a malformed 'target'; re-run detc compile")
        if not isinstance(library, str) or not (digest is None or isinstance(digest, str)):
            raise BadInputError(f"{path} has a malformed 'library'; re-run detc compile")
        if not (
            isinstance(params, dict)
            and isinstance(params.get("file", PARAMS_FILE), str)
            and isinstance(params.get("count", 0), int)
        ):
            raise BadInputError(f"{path} has a malformed 'params'; re-run detc compile")
        convention = document["calling_convention"]
        if convention not in CALLING_CONVENTIONS:
            raise BadInputError(
                f"{path}: unknown calling_convention {convention!r}; re-run detc compile"
            )
        typed = {"format", "format_version", "library_sha256", *_REQUIRED_FIELDS}
        return cls(
            path=path,
            format=FORMAT,
            format_version=FORMAT_VERSION,
            target=target,
            library=library,
            library_sha256=digest or None,
            params_file=params.get("file", PARAMS_FILE),
            params_count=params.get("count", 0),
            inputs=_tensor_specs(document["inputs"], "inputs", path),
            outputs=_tensor_specs(document["outputs"], "outputs", path),
            calling_convention=convention,
            other={k: v for k, v in document.items() if k not in typed},
            document=document,
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
            value = np.ascontiguousarray(feeds[spec.name])
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


def _inside(directory: Path, name: str, key: str, manifest_path: Path) -> Path:
    """``directory / name``, refusing a name that is absolute or leads out of ``directory``."""
    path = directory / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(directory.resolve()):
        raise BadInputError(
            f"{manifest_path}: '{key}' is {name!r}, not a file inside {directory}; "
            "re-run detc compile"
        )
    return path


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
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"{path} is missing; re-run detc compile") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadInputError(
                f"{path} is unreadable or corrupt ({err}); re-run detc compile"
            ) from err
        manifest = Manifest.parse(document, path)
        artifact = cls(directory, manifest)
        _inside(directory, manifest.params_file, "params", path)
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
        expected = self.manifest.library_sha256
        if expected and sha256_of(self.library_path) != expected:
            raise BadInputError(
                f"{self.library_path} does not match its manifest (corrupt or replaced); "
                "re-run detc compile"
            )

    def load_params(self) -> list[np.ndarray]:
        """main()'s parameters after the inputs, in order ([] when it takes none)."""
        count = self.manifest.params_count
        if not self.manifest.takes_params or count == 0:
            return []
        path = self.params_path
        keys = [param_key(i) for i in range(count)]
        try:
            with np.load(path, allow_pickle=False) as archive:
                absent = [key for key in keys if key not in archive.files]
                if absent:
                    raise BadInputError(
                        f"{path} lacks {absent[0]} ({count} params expected); re-run detc compile"
                    )
                return [np.ascontiguousarray(archive[key]) for key in keys]
        except FileNotFoundError:
            raise BadInputError(f"{path} is missing; re-run detc compile") from None
        except (OSError, KeyError, ValueError) as err:
            raise BadInputError(
                f"{path} is unreadable or corrupt ({err}); re-run detc compile"
            ) from err


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of the artifact in ``out_dir``, checked (:meth:`Artifact.open`), as JSON;
    BadInputError saying what is wrong."""
    return Artifact.open(out_dir).manifest.as_dict()
