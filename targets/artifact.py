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
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from detc.compiler.errors import BadInputError
from detc.targets.target import (
    LIBRARY_FILE,
    PARAMS_FILE,
    BuildContext,
    resolve_target,
    run_phases,
)

logger = logging.getLogger("detc.targets")

MANIFEST_FILE = "manifest.json"
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


def _commit(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, replacing a previous artifact only at the very end."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, retired)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(retired, out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as stream:
        json.dump(document, stream, indent=2)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())


def build_artifact(
    model: onnx.ModelProto,
    target: str,
    out_dir: Path,
    *,
    manifest_fields: Mapping[str, Any],
    num_threads: int | None = None,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    tuning: Any = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """Compile ``model`` for ``target`` ("x86", "x86:<mcpu>", …) into the directory ``out_dir``.

    Returns the manifest written to ``out_dir/manifest.json``. Progress lines (one per phase,
    only when ``progress``) and notices such as "untuned build" (always) go to ``report`` when
    given, else to the ``detc.targets`` logger (INFO / WARNING). ``num_threads`` is the core
    count the code is built for (``num-cores``; default: this machine's physical cores).
    ``tuning`` (a :class:`~detc.targets.tuning.search.TuningOptions`) selects the tuned pipeline:
    tuning database, optionally a search, blocked layout with weights bound as constants.
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
        _write_json(staging / MANIFEST_FILE, manifest)
        _commit(staging, out_dir)
    except BaseException:
        # Ctrl-C included: the staging directory must not outlive a failed build.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of the artifact in ``out_dir``, checked; BadInputError saying what is wrong."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_FILE
    if not out_dir.is_dir():
        raise BadInputError(f"artifact directory {out_dir} does not exist; re-run detc compile")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path} is missing; re-run detc compile") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(
            f"{path} is unreadable or corrupt ({err}); re-run detc compile"
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInputError(f"{path} is not a {FORMAT} manifest; re-run detc compile")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BadInputError(
            f"{path} has format_version {version!r}; this detc reads {FORMAT_VERSION}: "
            "re-run detc compile"
        )
    for key in ("target", "library", "params", "calling_convention", "inputs", "outputs"):
        if key not in manifest:
            raise BadInputError(f"{path} lacks '{key}'; re-run detc compile")
    return manifest
