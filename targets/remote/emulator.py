"""Run aarch64 artifacts on an x86 machine under qemu-user, to verify their numerics.

Emulation proves numerics only: nothing here measures or returns time.

The emulation environment is a small native runner (`aarch64_runner.cc`) cross-compiled against
``libtvm_runtime.so``, ``libtvm_runtime_extra.so`` (the ``tvm.contrib.sort.*`` functions sort,
argsort, TopK and NMS lower to) and ``libtvm_ffi.so`` from the aarch64 apache-tvm wheels of the
*same* versions as the host's TVM (the exported VM executable format must match), plus the
aarch64 C/C++ runtime libraries copied from the cross toolchain's sysroot. No Python runs under
emulation: the runner starts in a fraction of a second and needs no arm64 Debian root. It is
prepared once into
``<cache>/emulation/aarch64-tvm<v>-ffi<v>-r<hash>/`` — in a temporary directory renamed into
place, under a file lock so concurrent first uses prepare it once.

Data exchange: the host writes params and feeds as raw buffers plus a tab-separated plan (format
in `aarch64_runner.cc`); the runner writes raw outputs and an index per input set.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from detc.compiler.errors import BadInputError, DetcError, ToolchainMissingError
from detc.compiler.fileio import cache_dir, replace_directory
from detc.targets.manifest import Artifact
from detc.targets.remote.toolchain import (
    EM_AARCH64,
    CrossCompiler,
    elf_machine,
    find_aarch64_cross_compiler,
    require_qemu_aarch64,
)

_LOG = logging.getLogger("detc.targets.emulator")

# Bump when the environment's layout or build recipe changes: old caches are then ignored.
# 2: libtvm_runtime_extra.so joined lib/ and the runner links it.
_ENV_FORMAT = 2
_RUNNER_SOURCE = Path(__file__).with_name("aarch64_runner.cc")
_RUNNER_NAME = "detc-aarch64-runner"
_WHEEL_PLATFORM = "manylinux_2_28_aarch64"
# The apache-tvm-ffi wheel is CPython-specific; only its C libraries and headers are used, so any
# CPython version that has an aarch64 wheel will do.
_WHEEL_PYTHON_VERSION = "3.11"
# Libraries the runner and libtvm_runtime.so need from the aarch64 C/C++ runtime.
_SYSROOT_LIBRARIES = (
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "libstdc++.so.6",
    "libgcc_s.so.1",
)
# Input bytes handed to one qemu process; larger batches are split into several runs.
_MAX_INPUT_BYTES_PER_RUN = 512 * 1024 * 1024


class EmulatedRunError(DetcError):
    """The artifact failed inside the emulated aarch64 runner (exit 2)."""


# numpy dtype name <-> DLPack (type code, bits); lanes are always 1 here.
_DLPACK_CODES = {"i": 0, "u": 1, "f": 2}
_DLPACK_BOOL = 6
_DLPACK_BFLOAT = 4


def _dlpack_dtype(dtype: np.dtype) -> tuple[int, int, int]:
    if dtype.name == "bfloat16":
        return (_DLPACK_BFLOAT, 16, 1)
    if dtype.kind == "b":
        return (_DLPACK_BOOL, 8, 1)
    if dtype.kind in _DLPACK_CODES:
        return (_DLPACK_CODES[dtype.kind], dtype.itemsize * 8, 1)
    raise BadInputError(f"dtype {dtype} cannot be passed to an aarch64 artifact")


def _numpy_dtype(code: int, bits: int, lanes: int) -> np.dtype:
    if lanes != 1:
        raise EmulatedRunError(f"vector dtype (code {code}, {bits} bits x{lanes}) in outputs")
    if code == _DLPACK_BOOL:
        return np.dtype(np.bool_)
    if code == _DLPACK_BFLOAT and bits == 16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    kind = {value: key for key, value in _DLPACK_CODES.items()}.get(code)
    if kind is None:
        raise EmulatedRunError(f"unsupported output dtype code {code} ({bits} bits)")
    return np.dtype(f"{kind}{bits // 8}")


# --------------------------------------------------------------------------------------------
# Environment


def _host_tvm_versions() -> tuple[str, str]:
    try:
        return (
            importlib.metadata.version("apache-tvm"),
            importlib.metadata.version("apache-tvm-ffi"),
        )
    except importlib.metadata.PackageNotFoundError as error:
        raise ToolchainMissingError(
            f"{error.name} is not installed in this Python: "
            "pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0"
        ) from error


def _env_name() -> str:
    tvm_version, ffi_version = _host_tvm_versions()
    recipe = hashlib.sha256()
    recipe.update(_RUNNER_SOURCE.read_bytes())
    recipe.update(f"format={_ENV_FORMAT}".encode())
    return f"aarch64-tvm{tvm_version}-ffi{ffi_version}-r{recipe.hexdigest()[:10]}"


def _emulation_root() -> Path:
    root = cache_dir() / "emulation"
    root.mkdir(parents=True, exist_ok=True)
    return root


def emulation_env_status() -> str | None:
    """Path of the prepared environment for the host's TVM, or None when not yet prepared."""
    try:
        env = _emulation_root() / _env_name()
    except ToolchainMissingError:
        return None
    return str(env) if (env / "env.json").is_file() else None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_emulation_env() -> Path:
    """The aarch64 emulation environment, prepared into the cache on first use, reused after.

    Concurrency-safe (file lock) and atomic (prepared in a temporary directory, then renamed).
    Needs the aarch64 cross compiler (C++), qemu-aarch64 and pip access to the aarch64 wheels.
    """
    root = _emulation_root()
    name = _env_name()
    env = root / name
    if (env / "env.json").is_file():
        return env
    require_qemu_aarch64()
    compiler = find_aarch64_cross_compiler(require_cxx=True)
    with _exclusive_lock(root / f".{name}.lock"):
        if (env / "env.json").is_file():
            return env
        for leftover in root.glob(f".{name}.tmp-*"):  # from an interrupted preparation
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            _LOG.info("preparing the aarch64 emulation environment in %s (once)", env)
            _prepare_env(staging, compiler)
            staging.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
            # an incomplete directory left by hand is replaced
            replace_directory(staging, env)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return env


def _prepare_env(staging: Path, compiler: CrossCompiler) -> None:
    started = time.monotonic()
    tvm_version, ffi_version = _host_tvm_versions()
    work = staging / "build"
    lib = staging / "lib"
    sysroot_lib = staging / "sysroot" / "lib"
    bin_dir = staging / "bin"
    for directory in (work, lib, sysroot_lib, bin_dir):
        directory.mkdir(parents=True)

    wheels = _download_wheels(work / "wheels", tvm_version, ffi_version)
    include = work / "include"
    _extract_from_wheel(
        wheels["apache-tvm"],
        {"tvm/lib/libtvm_runtime.so": lib, "tvm/lib/libtvm_runtime_extra.so": lib},
    )
    _extract_from_wheel(
        wheels["apache-tvm-ffi"],
        {
            "tvm_ffi/lib/libtvm_ffi.so": lib,
            "tvm_ffi/include/": include,
            "tvm_ffi/3rdparty/dlpack/include/": include,
        },
    )
    _copy_sysroot_libraries(compiler, sysroot_lib)
    _compile_runner(compiler, include, lib, bin_dir / _RUNNER_NAME)
    shutil.rmtree(work)
    env_info = {
        "format": _ENV_FORMAT,
        "apache-tvm": tvm_version,
        "apache-tvm-ffi": ffi_version,
        "compiler": compiler.describe(),
        "runner_sha256": hashlib.sha256(_RUNNER_SOURCE.read_bytes()).hexdigest(),
        "prepared_seconds": round(time.monotonic() - started, 1),
    }
    _smoke_test_runner(staging)
    (staging / "env.json").write_text(json.dumps(env_info, indent=2) + "\n")


def _download_wheels(destination: Path, tvm_version: str, ffi_version: str) -> dict[str, Path]:
    requirements = [f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}"]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        _WHEEL_PLATFORM,
        "--python-version",
        _WHEEL_PYTHON_VERSION,
        "--dest",
        str(destination),
        *requirements,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        last = _last_line(completed.stderr) or _last_line(completed.stdout)
        raise ToolchainMissingError(
            f"could not download the aarch64 wheels {' '.join(requirements)} with pip ({last}): "
            "check network access, or put them in a directory listed in PIP_FIND_LINKS"
        )
    found: dict[str, Path] = {}
    for wheel in destination.glob("*.whl"):
        distribution = "apache-tvm-ffi" if wheel.name.startswith("apache_tvm_ffi-") else None
        if distribution is None and wheel.name.startswith("apache_tvm-"):
            distribution = "apache-tvm"
        if distribution is not None:
            found[distribution] = wheel
    missing = {"apache-tvm", "apache-tvm-ffi"} - found.keys()
    if missing:
        raise ToolchainMissingError(f"pip did not download {', '.join(sorted(missing))} wheels")
    return found


def _extract_from_wheel(wheel: Path, members: Mapping[str, Path]) -> None:
    """Copy files (`prefix` → destination dir) or trees (`prefix/` → destination root) out."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        for prefix, destination in members.items():
            matched = [name for name in names if name == prefix or name.startswith(prefix)]
            matched = [name for name in matched if not name.endswith("/")]
            if not matched:
                raise ToolchainMissingError(f"{wheel.name} has no {prefix}: unexpected wheel")
            for name in matched:
                relative = name[len(prefix) :] if prefix.endswith("/") else Path(name).name
                target = destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)


def _copy_sysroot_libraries(compiler: CrossCompiler, destination: Path) -> None:
    # Copied rather than referenced so the environment keeps working without the cross toolchain.
    for library in _SYSROOT_LIBRARIES:
        completed = subprocess.run(
            [compiler.cc, *compiler.flags, f"-print-file-name={library}"],
            capture_output=True,
            text=True,
            check=False,
        )
        located = Path(completed.stdout.strip())
        if completed.returncode != 0 or not located.is_absolute() or not located.is_file():
            raise ToolchainMissingError(
                f"{compiler.cc} cannot locate the aarch64 {library}: install "
                "`sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu`"
            )
        shutil.copyfile(located, destination / library)  # follows symlinks
        (destination / library).chmod(0o755)


def _compile_runner(compiler: CrossCompiler, include: Path, lib: Path, output: Path) -> None:
    assert compiler.cxx is not None  # find_aarch64_cross_compiler(require_cxx=True)
    command = [
        compiler.cxx,
        *compiler.flags,
        "-std=c++17",
        "-O2",
        "-I",
        str(include),
        str(_RUNNER_SOURCE),
        "-o",
        str(output),
        "-L",
        str(lib),
        # The runner calls nothing in these two directly, but loading them registers the Relax
        # VM executable loader (libtvm_runtime) and the tvm.contrib.sort.* functions TopK, sort
        # and NMS call (libtvm_runtime_extra) that model.so needs: keep them as dependencies.
        "-Wl,--no-as-needed",
        "-ltvm_runtime",
        "-ltvm_runtime_extra",
        "-ltvm_ffi",
        "-Wl,-rpath,$ORIGIN/../lib",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise ToolchainMissingError(
            f"cross-compiling the aarch64 runner with {compiler.cxx} failed: "
            f"{_first_error_line(completed.stderr)}"
        )


def _smoke_test_runner(env: Path) -> None:
    # Without arguments the runner prints its usage and exits 2 — only if every library loads.
    completed = subprocess.run(
        [*_qemu_command(env)], capture_output=True, text=True, timeout=120, check=False
    )
    if completed.returncode != 2 or "usage" not in completed.stderr:
        raise EmulatedRunError(
            f"the aarch64 runner built in {env} does not start under qemu "
            f"(exit {completed.returncode}): {_last_line(completed.stderr)}"
        )


def _qemu_command(env: Path) -> list[str]:
    sysroot = env / "sysroot"
    return [
        require_qemu_aarch64(),
        # "max" emulates every optional feature (dot product, i8mm, bf16, SVE) the presets use.
        "-cpu",
        "max",
        "-L",
        str(sysroot),
        # Resolve libraries from the environment only, never from a host arm64 multiarch tree.
        "-E",
        f"LD_LIBRARY_PATH={sysroot / 'lib'}:{env / 'lib'}",
        str(env / "bin" / _RUNNER_NAME),
    ]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "error" in line:
            return line.strip()
    return _last_line(text)


# --------------------------------------------------------------------------------------------
# Running


def _open_aarch64_artifact(artifact_dir: Path) -> Artifact:
    artifact = Artifact.open(artifact_dir)
    library = artifact.library_path
    machine = elf_machine(library)
    if machine != EM_AARCH64:
        built_for = artifact.manifest.target.get("name", "another machine")
        raise BadInputError(
            f"{library} is not an aarch64 library (built for {built_for}, ELF machine {machine}): "
            "only --target arm artifacts run under emulation"
        )
    return artifact


def _tensor_line(kind: str, value: np.ndarray, path: Path) -> str:
    code, bits, lanes = _dlpack_dtype(value.dtype)
    shape = ",".join(str(dim) for dim in value.shape)
    value.tofile(path)
    return f"{kind}\t{code}\t{bits}\t{lanes}\t{shape}\t{path}"


def _run_chunk(
    env: Path,
    model_path: Path,
    params: Sequence[np.ndarray],
    feed_sets: Sequence[Sequence[np.ndarray]],
    output_names: Sequence[str],
    timeout_s: float | None,
) -> list[dict[str, np.ndarray]]:
    with tempfile.TemporaryDirectory(prefix="detc-emulate-") as tmp:
        work = Path(tmp)
        for path_part in (str(model_path), tmp):
            if "\t" in path_part or "\n" in path_part:
                raise BadInputError(f"path {path_part!r} contains a tab or newline")
        lines = ["detc-aarch64-plan\t1", f"model\t{model_path}"]
        for index, value in enumerate(params):
            lines.append(_tensor_line("param", value, work / f"p{index:05d}.bin"))
        out_dirs = []
        for set_index, inputs in enumerate(feed_sets):
            out_dir = work / f"out{set_index:05d}"
            out_dir.mkdir()
            out_dirs.append(out_dir)
            lines.append(f"run\t{out_dir}")
            for input_index, value in enumerate(inputs):
                path = work / f"in{set_index:05d}_{input_index:03d}.bin"
                lines.append(_tensor_line("input", value, path))
        plan = work / "plan.tsv"
        plan.write_text("\n".join(lines) + "\n")
        try:
            completed = subprocess.run(
                [*_qemu_command(env), str(plan)],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise EmulatedRunError(
                f"emulated aarch64 run of {model_path} exceeded {timeout_s} s"
            ) from error
        if completed.returncode != 0:
            raise EmulatedRunError(
                f"emulated aarch64 run of {model_path} failed "
                f"({_describe_exit(completed.returncode)}): "
                f"{_last_line(completed.stderr) or 'no message'}"
            )
        return [_read_outputs(out_dir, output_names, model_path) for out_dir in out_dirs]


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit {returncode}"


def _read_outputs(
    out_dir: Path, output_names: Sequence[str], model_path: Path
) -> dict[str, np.ndarray]:
    index_path = out_dir / "outputs.tsv"
    if not index_path.is_file():
        raise EmulatedRunError(f"the aarch64 runner wrote no outputs for {model_path}")
    records = [line.split("\t") for line in index_path.read_text().splitlines() if line]
    if output_names and len(records) != len(output_names):
        raise EmulatedRunError(
            f"{model_path} returned {len(records)} outputs, its manifest lists {len(output_names)}"
        )
    outputs: dict[str, np.ndarray] = {}
    for position, (_, code, bits, lanes, shape_text, file_name) in enumerate(records):
        dtype = _numpy_dtype(int(code), int(bits), int(lanes))
        shape = tuple(int(dim) for dim in shape_text.split(",") if dim)
        name = output_names[position] if output_names else f"output_{position}"
        outputs[name] = np.fromfile(out_dir / file_name, dtype=dtype).reshape(shape)
    return outputs


def run_emulated_batch(
    artifact_dir: Path,
    feed_sets: Sequence[Mapping[str, np.ndarray]],
    *,
    timeout_s: float | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run an aarch64 artifact on each feed set under qemu; outputs keyed by manifest names.

    Feed sets go through as few qemu processes as memory allows (params are loaded once per
    process). Inputs must have the manifest's dtypes and shapes. Errors: `ToolchainMissingError`
    (qemu or cross compiler missing), `BadInputError` (bad artifact or feeds),
    `EmulatedRunError` (the artifact failed inside the runner; the runner's last stderr line).
    """
    artifact = _open_aarch64_artifact(Path(artifact_dir))
    manifest = artifact.manifest
    ordered_sets = [
        manifest.ordered_inputs(feeds, set_index) for set_index, feeds in enumerate(feed_sets)
    ]
    params = artifact.load_params()
    output_names = manifest.output_names
    env = ensure_emulation_env()

    results: list[dict[str, np.ndarray]] = []
    chunk: list[list[np.ndarray]] = []
    chunk_bytes = 0
    # the runner loads a private copy whose sha256 matched the manifest's
    with artifact.library_copy() as model_path:
        for inputs in ordered_sets:
            size = sum(value.nbytes for value in inputs)
            if chunk and chunk_bytes + size > _MAX_INPUT_BYTES_PER_RUN:
                results += _run_chunk(env, model_path, params, chunk, output_names, timeout_s)
                chunk, chunk_bytes = [], 0
            chunk.append(inputs)
            chunk_bytes += size
        if chunk:
            results += _run_chunk(env, model_path, params, chunk, output_names, timeout_s)
    return results


def run_emulated(
    artifact_dir: Path, feeds: Mapping[str, np.ndarray], *, timeout_s: float | None = None
) -> dict[str, np.ndarray]:
    """Run an aarch64 artifact once under qemu; outputs keyed by the manifest's output names."""
    return run_emulated_batch(artifact_dir, [feeds], timeout_s=timeout_s)[0]
