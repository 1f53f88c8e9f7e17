"""The artifact directory: building it atomically, and reading its manifest back.

    <out_dir>/manifest.json   what was built, for what, from what (format "detc-artifact" v1)
    <out_dir>/model.so        the Relax VM executable (``export_library``)
    <out_dir>/params.npz      main()'s parameters after the inputs: p00000, p00001, …
    <out_dir>/reference.onnx  the float model compiled from (``detc compile`` keeps it, its
                              sha256 in the manifest): verify's and bench's default reference
    <out_dir>/reference_qdq.onnx  int8 artifacts only: the quantized model as QDQ ONNX, which
                              ``detc verify`` runs in onnxruntime as the quantized reference
    <out_dir>/report/         written later by ``detc verify --data`` (replaced by a rebuild)

The directory is built under a hidden temporary name beside ``out_dir`` (``.NAME.tmp-PID-…``,
the builder's process id in it) and renamed into place only when every phase has succeeded, so a
failed or interrupted build leaves neither a half-written ``out_dir`` nor the temporary directory,
and an existing artifact survives it. A build killed outright (SIGKILL, power loss) cannot clean
up: the next build of the same ``out_dir`` removes what a builder that is no longer running left.
The output location is checked before any work (:func:`check_output_location`).

The artifact is reproducible: the same model, target and options give byte-identical files, so
a build system may compare artifacts by hash. The manifest holds no build times (the progress
lines report them) and no date unless ``SOURCE_DATE_EPOCH`` gives one (``built_at``).

Reading an artifact back (the typed :class:`Manifest`, :meth:`Artifact.open` and its checks) is
:mod:`detc.targets.manifest`; its names are re-exported here.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import replace_directory, write_text_atomically
from detc.targets.context import (
    LIBRARY_FILE,
    MANIFEST_FILE,
    PARAMS_FILE,
    BuildContext,
    PrepostRequest,
)
from detc.targets.manifest import (
    CALLING_CONVENTIONS,
    FORMAT,
    FORMAT_VERSION,
    MAX_INPUT_BYTES,
    Artifact,
    Manifest,
    contiguous,
    read_manifest,
    sha256_of,
    tensor_bytes,
)
from detc.targets.target import resolve_target, run_phases
from detc.targets.tuning.options import TuningOptions

logger = logging.getLogger("detc.targets")

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
        "prepost",
    }
)
QUANTIZED_REFERENCE_FILE = "reference_qdq.onnx"
#: the float model compiled from, as ONNX (a .pt2 or torch module as exported): the reference
#: ``detc verify`` and ``bench`` compare with unless told otherwise
SOURCE_REFERENCE_FILE = "reference.onnx"
#: what ``detc verify --data`` writes into the artifact by default
REPORT_DIR = "report"
#: files ``build_artifact(extra_files=...)`` may add beside the library
#: the float graph a pruned or factorized build compiled (its tensors are the artifact's to match)
TRANSFORMED_REFERENCE_FILE = "reference_transformed.onnx"
EXTRA_FILES = frozenset(
    {QUANTIZED_REFERENCE_FILE, SOURCE_REFERENCE_FILE, TRANSFORMED_REFERENCE_FILE}
)
_ARTIFACT_FILES = frozenset({MANIFEST_FILE, LIBRARY_FILE, PARAMS_FILE, REPORT_DIR}) | EXTRA_FILES


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
    try:
        entries = {p.name for p in directory.iterdir()}
    except OSError as err:
        raise BadInputError(
            f"{directory} cannot be read ({err.strerror or err}); choose another output path"
        ) from None
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


def _absolute(out_dir: Path | str) -> Path:
    # normalised (``..`` folded) but not resolved: a symlinked parent folder stays as named
    return Path(os.path.abspath(out_dir))


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-{os.getpid()}-"


#: what a build of ``out_dir`` leaves beside it while it runs: the staging folder (with the
#: builder's pid) and, for a moment, the previous artifact moved aside by replace_directory
def _leftover_pattern(out_dir: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out_dir.name)}\.(?:tmp-(\d+)-[^/]+|old-[0-9a-f]{{8}})")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _remove_leftovers(out_dir: Path) -> None:
    """Remove the staging folders of builds of ``out_dir`` whose builder is gone (killed before
    it could clean up), and previous artifacts a killed build had moved aside."""
    pattern = _leftover_pattern(out_dir)
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = found.group(1)
        if pid is not None and (int(pid) == os.getpid() or _process_alive(int(pid))):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def check_output_location(out_dir: Path | str) -> None:
    """BadInputError unless a build can write the artifact folder ``out_dir``: checked before
    any work, so that a bad ``-o`` fails in a second, not after the whole build.

    Refused: an existing file or non-artifact folder at ``out_dir``, a file where a parent
    folder should be, a name too long for the file system (with the staging folder's suffix),
    and a folder this process cannot create entries in (read-only, no permission).
    """
    out_dir = _absolute(out_dir)
    try:
        _check_writable_location(out_dir)
    except (OSError, ValueError) as err:  # e.g. ENAMETOOLONG from a mere stat, a NUL byte
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise BadInputError(f"{out_dir}: {reason}; choose another output path") from None


def _check_writable_location(out_dir: Path) -> None:
    _check_replaceable(out_dir)
    existing, missing = out_dir.parent, [out_dir.name]
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        missing.append(existing.name)
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(
            f"{out_dir}: {existing} is a file, not a folder; choose another output path"
        )
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    staging_name = _staging_prefix(out_dir) + "x" * 8
    for name in [*missing, staging_name]:
        if len(os.fsencode(name)) > name_max:
            raise BadInputError(
                f"{out_dir}: the name {name[:40]!r}... is too long for the file system "
                f"(at most {name_max - len(staging_name) + len(out_dir.name)} bytes for the "
                "artifact folder); choose a shorter output path"
            )
    if len(os.fsencode(str(out_dir / staging_name))) >= path_max:
        raise BadInputError(f"{out_dir}: the path is too long; choose a shorter output path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".detc-probe-", dir=existing))
    except OSError as err:
        raise BadInputError(
            f"{out_dir}: cannot create the artifact in {existing} ({err.strerror or err}); "
            "choose another output path"
        ) from None


def _check_graph_inputs(model: onnx.ModelProto) -> None:
    """Refuse fixed input sizes no artifact can run: a zero-sized dimension (an empty input,
    which verification would take for a dynamic one) and inputs over :data:`MAX_INPUT_BYTES`.
    Symbolic dimensions are the target's import phase's to refuse (with the flag that fixes
    them)."""
    total = 0
    inputs, _ = graph_io(model)
    for spec in inputs:
        shape = spec["shape"]
        if not all(isinstance(d, int) for d in shape):
            continue
        if 0 in shape:
            shown = "x".join(map(str, shape))
            wanted = "x".join(str(d or 1) for d in shape)
            raise BadInputError(
                f"input '{spec['name']}' has a zero-sized dimension ({shown}): an artifact runs "
                f"on non-empty inputs; give a size with --input-shape {spec['name']}:{wanted}"
            )
        total += tensor_bytes(shape, np.dtype(spec["dtype"]))
    if total > MAX_INPUT_BYTES:
        raise BadInputError(
            f"the model's inputs take {total:,} bytes, over detc's {MAX_INPUT_BYTES:,}-byte limit; "
            "give smaller sizes with --input-shape"
        )


def _manifest_build_date() -> str | None:
    """``SOURCE_DATE_EPOCH`` as an ISO date (reproducible-builds.org); None without it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return None
    if not epoch.isdigit():
        raise BadInputError(f"SOURCE_DATE_EPOCH={epoch!r}: expected whole seconds since 1970")
    moment = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)
    return moment.isoformat(timespec="seconds")


def _check_prepost_target(name: str, device_kind: str, prepost: PrepostRequest) -> None:
    """The compiled pre/post-processing is CPU code (serial NMS, parallel letterbox loops)."""
    if device_kind != "cpu":
        flags = [
            f
            for f, on in (("--with-preprocess", prepost.preprocess), ("--with-nms", prepost.nms))
            if on
        ]
        raise BadInputError(
            f"{' and '.join(flags)}: target {name} is not supported (compiled pre/post-processing "
            "runs on CPU targets: x86, arm); decode on the host with detc's Python path instead"
        )


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
    precision: str | None = None,
    prepost: PrepostRequest | None = None,
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
    ``precision`` ("fp16", ...: one of the target's ``precisions``) asks for that arithmetic;
    None computes as the model is.
    ``prepost`` compiles letterbox/normalisation and/or decode + NMS around the network (the
    manifest then says so under ``prepost``, and its inputs/outputs are the wrapped ones).
    """
    clash = OWNED_FIELDS & set(manifest_fields)
    if clash:
        raise ValueError(f"manifest_fields may not set {sorted(clash)}: build_artifact owns them")
    unknown = set(extra_files or {}) - EXTRA_FILES
    if unknown:
        raise ValueError(f"extra_files {sorted(unknown)}: the artifact layout has no such files")
    chosen = resolve_target(target)
    out_dir = _absolute(out_dir)
    check_output_location(out_dir)
    _check_graph_inputs(model)
    if precision is not None and precision not in chosen.precisions:
        raise BadInputError(
            f"target {chosen.name} offers precision {', '.join(chosen.precisions)}, not {precision}"
        )
    if prepost is not None:
        _check_prepost_target(chosen.name, chosen.device_kind, prepost)
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
    _remove_leftovers(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir), dir=out_dir.parent))
    staging.chmod(0o777 & ~_current_umask())  # mkdtemp makes it private (0700)
    try:
        context = BuildContext(
            model=model,
            staging_dir=staging,
            num_threads=threads,
            progress=progress_line,
            warn=notice,
            tuning=tuning,
            pipeline=chosen.pipeline_for(tuning),
            precision=precision,
            prepost=prepost,
        )
        inputs, outputs = graph_io(model)
        network_inputs = len(inputs)
        run_phases(chosen, context)
        if prepost is not None:
            from detc.targets.prepost.wrap import prepost_io

            inputs, outputs = prepost_io(prepost, inputs, outputs)
            network_inputs = 1
        if network_inputs != context.num_inputs:
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
            # no times: they differ on every build, and the artifact must not (progress reports
            # them)
            "build": {
                "num_threads": threads,
                "phases": [
                    {"name": name, "summary": summary} for name, _, summary in context.timings
                ],
            },
            "versions": _versions(),
            "library_sha256": sha256_of(staging / LIBRARY_FILE),
            **manifest_fields,
        }
        if prepost is not None:
            manifest["prepost"] = prepost.manifest_entry()
        built_at = _manifest_build_date()
        if built_at is not None:
            manifest["built_at"] = built_at
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


__all__ = [
    "CALLING_CONVENTIONS",
    "EXTRA_FILES",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_INPUT_BYTES",
    "OWNED_FIELDS",
    "QUANTIZED_REFERENCE_FILE",
    "REPORT_DIR",
    "SOURCE_REFERENCE_FILE",
    "TRANSFORMED_REFERENCE_FILE",
    "Artifact",
    "Manifest",
    "build_artifact",
    "check_output_location",
    "contiguous",
    "graph_io",
    "read_manifest",
    "sha256_of",
]
