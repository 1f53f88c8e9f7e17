"""Hostile inputs built in code, and the harness that runs ``detc`` on them as a user would.

Every run is a fresh ``python -m detc.compiler.cli`` in a folder of its own, with HOME, the cache
and TMPDIR inside that folder, so that a snapshot of the folder before and after shows every file
the run created, changed or removed anywhere but its ``-o``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9

#: what a refusal may cost: wall seconds (the cases run side by side) and peak resident memory
TIME_LIMIT_S = 120.0
MEMORY_LIMIT_BYTES = 3 * 1024**3


# ---- models ---------------------------------------------------------------------------------


def conv_model(seed: int = 0, *, batch: int | str = 1, name: str = "conv") -> onnx.ModelProto:
    """x [batch,3,8,8] -> Conv 3x3 (4 channels) -> Relu -> y: the valid model everything starts
    from."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name=name, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )


def single_node_model(
    op_type: str,
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    output_shape: Sequence[int | str] | None,
    *,
    initializers: Mapping[str, np.ndarray] | None = None,
    opset: int = OPSET,
    node_name: str = "node",
    **attributes: Any,
) -> onnx.ModelProto:
    names = [name for name, _ in inputs] + list(initializers or {})
    graph = helper.make_graph(
        [helper.make_node(op_type, names, ["y"], name=node_name, **attributes)],
        "single",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION
    )


def save_with_external_data(model: onnx.ModelProto, folder: Path, location: str) -> Path:
    """``folder/model.onnx`` with its weights in ``folder/weights.bin``, then the location the
    model names rewritten to ``location`` (the file itself stays weights.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)
    return path


def with_node_name_bytes(model: onnx.ModelProto, name: bytes) -> bytes:
    """The serialised model with its first node's name replaced by raw ``name`` bytes (which
    the protobuf API would refuse to set when they are not UTF-8)."""
    placeholder = "Q" * len(name)  # the same length: no enclosing length prefix changes
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.node[0].name = placeholder
    data = model.SerializeToString()
    old = bytes([0x1A, len(name)]) + placeholder.encode()  # field 3 (name), length-delimited
    assert data.count(old) == 1
    return data.replace(old, bytes([0x1A, len(name)]) + name)


# ---- payloads ---------------------------------------------------------------------------------

EVIL_LIBRARY_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void payload(void) {
    FILE *marker = fopen(MARKER, "w");
    if (marker) fclose(marker);
}
"""


def build_evil_library(folder: Path, marker: Path) -> Path | None:
    """A shared library whose constructor creates ``marker`` when it is loaded; None without a
    C compiler."""
    source = folder / "evil.c"
    source.write_text(EVIL_LIBRARY_SOURCE)
    library = folder / "evil.so"
    try:
        subprocess.run(
            ["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(library), str(source)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return library


def rewrite_zip(source: Path, target: Path, replace: Mapping[str, bytes | None]) -> Path:
    """Copy a zip, replacing members whose name ends with a key (None drops the member)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data: bytes | None = old.read(info)
            for suffix, replacement in replace.items():
                if info.filename.endswith(suffix):
                    data = replacement
            if data is not None:
                new.writestr(info, data)
    return target


def edit_manifest(artifact: Path, **changes: object) -> None:
    """Set top-level manifest fields (None removes one)."""
    path = artifact / "manifest.json"
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    path.write_text(json.dumps(document, indent=2))


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def npz_with_declared_shape(path: Path, key: str, shape: tuple[int, ...]) -> None:
    """An .npz whose array ``key`` declares ``shape`` in its header but carries 16 bytes."""
    stream = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(stream, header)  # the magic, then the header
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{key}.npy", stream.getvalue() + bytes(16))


# ---- running the CLI ------------------------------------------------------------------------


@dataclass
class Run:
    """What one ``detc`` run did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_bytes: int
    #: paths (relative to the run's folder) created, changed or removed outside ``-o``
    touched: list[str] = field(default_factory=list)

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def child_env(folder: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a run: HOME, the caches and TMPDIR inside ``folder``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DETC_", "TVM_"))}
    home = folder / "home"
    tmp = folder / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        TMPDIR=str(tmp),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONHASHSEED="0",
        COLUMNS="200",
    )
    env.update(extra or {})
    return env


def snapshot(folder: Path, skip: Sequence[Path] = ()) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (but those under ``skip``) -> (size, mtime_ns)."""
    skipped = [p.absolute() for p in skip]
    found: dict[str, tuple[int, int]] = {}
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = [d for d in dirs if not any((here / d).absolute() == s for s in skipped)]
        for name in files + dirs:
            path = here / name
            if any(path.absolute() == s or path.absolute().is_relative_to(s) for s in skipped):
                continue
            try:
                info = path.lstat()
            except OSError:
                continue
            # a folder counts by its existence (a temporary folder made and removed inside it
            # is no trace), a file by its size and time
            is_dir = path.is_dir() and not path.is_symlink()
            found[str(path.relative_to(folder))] = (
                (0, 0) if is_dir else (info.st_size, info.st_mtime_ns)
            )
    return found


def run_detc(
    args: Sequence[str],
    folder: Path,
    *,
    output: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = TIME_LIMIT_S,
) -> Run:
    """``python -m detc.compiler.cli ARGS`` in ``folder``; records time, peak memory (the
    child's own, from wait4) and what it touched outside ``output``."""
    skip = [output] if output is not None else []
    environment = child_env(folder, env)
    before = snapshot(folder, skip)
    out_path = folder.parent / f".{folder.name}.out"
    err_path = folder.parent / f".{folder.name}.err"
    argv = [sys.executable, "-m", "detc.compiler.cli", *args]
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            argv,
            cwd=folder,
            env=environment,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        status, usage = _wait(process, started + timeout_s)
    seconds = time.monotonic() - started
    returncode = os.waitstatus_to_exitcode(status) if status is not None else 124
    run = Run(
        argv=list(args),
        returncode=returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        seconds=seconds,
        max_rss_bytes=usage.ru_maxrss * 1024 if usage is not None else 0,
    )
    out_path.unlink()
    err_path.unlink()
    after = snapshot(folder, skip)
    run.touched = sorted(
        name for name in set(before) | set(after) if before.get(name) != after.get(name)
    )
    return run


def _wait(process: subprocess.Popen[bytes], deadline: float) -> tuple[int | None, Any]:
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        if time.monotonic() > deadline:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = -9
            return None, usage
        time.sleep(0.02)
