"""``detc package``: an artifact as a self-contained folder to copy to the device.

    BUNDLE/
      bundle.json             what was packaged: format "detc-bundle" v1, architecture, target,
                              inputs and outputs, versions, the artifact's manifest
      SHA256SUMS              sha256 of every other file (``sha256sum -c SHA256SUMS`` reads it);
                              detc_open / detc-run / :meth:`Bundle.open` check it first
      model/model.so          the compiled model (the artifact's library)
      model/manifest.json     the artifact's manifest, as compiled
      model/io.tsv            inputs, outputs, params and class names for the C runtime (no JSON
                              parser there)
      model/params/p*.bin     main()'s parameters as raw little-endian buffers (no .npz on device)
      lib/                    libdetc_runtime.so, libtvm_runtime.so, libtvm_runtime_extra.so
                              (tvm.contrib.sort.*: TopK, argsort, NMS), libtvm_ffi.so (the
                              bundle's architecture; found through the binaries' $ORIGIN rpath)
      bin/detc-run            the command-line runner (native: no Python, no compiler)
      include/detc_runtime.h  the C API (detc_ppm.h: a header-only binary PPM reader)
      example/                main.cc and CMakeLists.txt: an application built on the C API
      python/detc_bundle.py   the bundle from Python with numpy alone (ctypes over the C API; the
                              same module as ``detc.load(BUNDLE)``)
      README.md               how to run it on the device

libdetc_runtime and detc-run are compiled here, at package time, with the host's C++ compiler
(x86_64) or the aarch64 cross compiler, against the TVM runtime libraries the bundle ships: the
x86_64 ones from this Python's TVM wheels, the aarch64 ones from the emulation environment
(:func:`~detc.targets.remote.emulator.ensure_emulation_env`), both the versions the artifact was
built with. The compiled runtime is cached per architecture, TVM version and source digest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError, ToolchainMissingError
from detc.compiler.fileio import cache_dir, replace_directory
from detc.compiler.reference import TensorSpec
from detc.targets.artifact import Artifact, sha256_of
from detc.targets.bundle.detections import gives_detections
from detc.targets.manifest import Manifest
from detc.targets.remote.toolchain import EM_AARCH64, EM_X86_64, elf_machine

BUNDLE_FORMAT = "detc-bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
SUMS_FILE = "SHA256SUMS"
INDEX_FILE = "model/io.tsv"
RUNNER_FILE = "bin/detc-run"
RUNTIME_LIBRARY = "libdetc_runtime.so"
#: libtvm_runtime_extra holds tvm.contrib.sort.* (what sort, argsort, TopK and NMS lower to)
TVM_LIBRARIES = ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_ffi.so")
#: the bundle's architectures, by the ELF machine of the artifact's library
ARCHITECTURES = {EM_X86_64: "x86_64", EM_AARCH64: "aarch64"}

RUNTIME_SOURCES = Path(__file__).with_name("runtime")
_HEADER = "detc_runtime.h"
_PPM_HEADER = "detc_ppm.h"
#: detc_runtime.h's DETC_RUNTIME_API_VERSION, recorded in bundle.json
RUNTIME_API_VERSION = 2
_LIBRARY_SOURCE = "detc_runtime.cc"
_RUNNER_SOURCE = "detc_run.cc"
_EXAMPLE_FILES = ("example/main.cc", "example/CMakeLists.txt")
_DEVICE_README = "DEVICE_README.md"
#: the standalone ctypes loader (detc.targets.bundle.loader), as the bundle ships it
_PYTHON_LOADER = Path(__file__).with_name("loader.py")
PYTHON_LOADER_FILE = "python/detc_bundle.py"
# Bump when the compile recipe changes: cached runtimes built the old way are then ignored.
_RUNTIME_RECIPE = 2


class BundleIntegrityError(BadInputError):
    """A bundle's file does not match SHA256SUMS (exit 2: copy the bundle again)."""


# ---- opening a bundle --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A bundle folder whose files all match its SHA256SUMS: :meth:`open` it."""

    directory: Path
    #: bundle.json: format, architecture, target, inputs, outputs, versions, manifest
    document: Mapping[str, Any]

    @classmethod
    def open(cls, directory: Path | str) -> Bundle:
        """Check every file SHA256SUMS lists (and that it lists the model's files), read
        bundle.json; BadInputError / BundleIntegrityError naming the file otherwise."""
        directory = Path(directory)
        sums = directory / SUMS_FILE
        if not sums.is_file():
            raise BadInputError(f"{directory} holds no {SUMS_FILE}: not a detc bundle")
        listed: set[str] = set()
        for line in sums.read_text(encoding="utf-8").splitlines():
            if not line:
                continue
            digest, separator, name = line[:64], line[64:66], line[66:]
            if (
                separator not in ("  ", " *")
                or Path(name).is_absolute()
                or ".." in Path(name).parts
            ):
                raise BadInputError(f"{sums} has a malformed line: {line!r}")
            path = directory / name
            if not path.is_file():
                raise BundleIntegrityError(f"{path} is missing: copy the bundle again")
            if sha256_of(path) != digest:
                raise BundleIntegrityError(
                    f"{path} does not match {SUMS_FILE} (corrupt or replaced): copy the bundle "
                    "again, or package the artifact anew"
                )
            listed.add(name)
        for required in (BUNDLE_FILE, INDEX_FILE, RUNNER_FILE):
            if required not in listed:
                raise BundleIntegrityError(f"{sums} does not list {required}")
        document = json.loads((directory / BUNDLE_FILE).read_text(encoding="utf-8"))
        if document.get("format") != BUNDLE_FORMAT:
            raise BadInputError(f"{directory / BUNDLE_FILE} is not a {BUNDLE_FORMAT} file")
        if document.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise BadInputError(
                f"{directory / BUNDLE_FILE} has format_version "
                f"{document.get('format_version')!r}; this detc reads {BUNDLE_FORMAT_VERSION}"
            )
        return cls(directory, document)

    @property
    def architecture(self) -> str:
        return str(self.document["architecture"])

    @property
    def runner(self) -> Path:
        return self.directory / RUNNER_FILE

    @property
    def class_names(self) -> tuple[str, ...]:
        """The model spec's class names (``class`` of a detection indexes them); () if none."""
        return tuple(str(name) for name in self.document.get("class_names", ()))

    @property
    def gives_detections(self) -> bool:
        """Whether the model was compiled with ``--with-nms`` (bin/detc-run prints detections)."""
        return gives_detections(self.document.get("outputs", ()))


# ---- the native runtime, compiled per architecture ---------------------------------------------


@dataclass(frozen=True)
class _Toolchain:
    architecture: str
    cxx: str
    flags: tuple[str, ...]
    tvm_lib_dir: Path  # TVM_LIBRARIES of the architecture
    include_dir: Path  # tvm_ffi's headers (with dlpack): the same on every architecture


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainMissingError(f"the Python package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _host_tvm_versions() -> dict[str, str]:
    return {
        "tvm": importlib.metadata.version("apache-tvm"),
        "tvm_ffi": importlib.metadata.version("apache-tvm-ffi"),
    }


def _toolchain(architecture: str) -> _Toolchain:
    include = _package_dir("tvm_ffi") / "include"
    if architecture == "x86_64":
        cxx = shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            raise ToolchainMissingError(
                "packaging compiles the bundle's runtime with a C++ compiler: "
                "`sudo apt-get install g++` (or set CXX)"
            )
        # The wheels keep the libraries in their own packages' lib folders.
        staged = cache_dir() / "bundle" / f"x86_64-tvm-libs-r{_RUNTIME_RECIPE}-{_versions_tag()}"
        if not all((staged / name).is_file() for name in TVM_LIBRARIES):
            _stage_host_tvm_libraries(staged)
        return _Toolchain(architecture, cxx, (), staged, include)
    from detc.targets.remote.emulator import ensure_emulation_env
    from detc.targets.remote.toolchain import find_aarch64_cross_compiler

    compiler = find_aarch64_cross_compiler(require_cxx=True)
    assert compiler.cxx is not None  # require_cxx=True
    env = ensure_emulation_env()
    return _Toolchain(architecture, compiler.cxx, compiler.flags, env / "lib", include)


def _versions_tag() -> str:
    versions = _host_tvm_versions()
    return f"tvm{versions['tvm']}-ffi{versions['tvm_ffi']}"


def _stage_host_tvm_libraries(staged: Path) -> None:
    sources = {
        "libtvm_runtime.so": _package_dir("tvm") / "lib" / "libtvm_runtime.so",
        "libtvm_runtime_extra.so": _package_dir("tvm") / "lib" / "libtvm_runtime_extra.so",
        "libtvm_ffi.so": _package_dir("tvm_ffi") / "lib" / "libtvm_ffi.so",
    }
    staging = Path(tempfile.mkdtemp(prefix=".tvm-libs-", dir=cache_dir()))
    try:
        for name, source in sources.items():
            if not source.is_file():
                raise ToolchainMissingError(f"{source} is missing: reinstall the TVM wheels")
            shutil.copyfile(source, staging / name)
        staging.chmod(0o755)
        staged.parent.mkdir(parents=True, exist_ok=True)
        _publish(staging, staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, destination: Path) -> None:
    """Rename ``staging`` to ``destination`` unless another process got there first."""
    try:
        os.rename(staging, destination)
    except OSError:
        if not destination.is_dir():
            raise


def _run_compiler(command: list[str], what: str) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        errors = [line for line in completed.stderr.splitlines() if "error" in line]
        first = (errors or completed.stderr.strip().splitlines() or ["no message"])[0]
        raise ToolchainMissingError(f"compiling {what} with {command[0]} failed: {first}")


def _runtime_build(toolchain: _Toolchain) -> Path:
    """A folder with lib/libdetc_runtime.so and bin/detc-run for ``toolchain``'s architecture,
    compiled once into the cache."""
    recipe = hashlib.sha256(f"recipe={_RUNTIME_RECIPE};{toolchain.cxx};{toolchain.flags}".encode())
    for name in (_HEADER, _PPM_HEADER, _LIBRARY_SOURCE, _RUNNER_SOURCE):
        recipe.update((RUNTIME_SOURCES / name).read_bytes())
    for name in TVM_LIBRARIES:
        recipe.update(sha256_of(toolchain.tvm_lib_dir / name).encode())
    root = cache_dir() / "bundle"
    built = root / f"runtime-{toolchain.architecture}-r{recipe.hexdigest()[:12]}"
    if (built / RUNNER_FILE).is_file():
        return built
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{built.name}.tmp-", dir=root))
    try:
        (staging / "lib").mkdir()
        (staging / "bin").mkdir()
        library = staging / "lib" / RUNTIME_LIBRARY
        common = [toolchain.cxx, *toolchain.flags, "-std=c++17", "-O2", "-Wall"]
        _run_compiler(
            [
                *common,
                "-fPIC",
                "-shared",
                "-fvisibility=hidden",
                "-I",
                str(toolchain.include_dir),
                str(RUNTIME_SOURCES / _LIBRARY_SOURCE),
                "-o",
                str(library),
                "-L",
                str(toolchain.tvm_lib_dir),
                # Loading libtvm_runtime registers the Relax VM executable loader model.so needs,
                # libtvm_runtime_extra the tvm.contrib.sort.* functions TopK and NMS call, though
                # nothing here calls either directly: keep them as dependencies.
                "-Wl,--no-as-needed",
                "-ltvm_runtime",
                "-ltvm_runtime_extra",
                "-ltvm_ffi",
                "-Wl,-rpath,$ORIGIN",
                "-s",
            ],
            f"{RUNTIME_LIBRARY} ({toolchain.architecture})",
        )
        _run_compiler(
            [
                *common,
                "-I",
                str(RUNTIME_SOURCES),
                str(RUNTIME_SOURCES / _RUNNER_SOURCE),
                "-o",
                str(staging / RUNNER_FILE),
                "-L",
                str(library.parent),
                "-ldetc_runtime",
                f"-Wl,-rpath-link,{toolchain.tvm_lib_dir}",
                "-Wl,-rpath,$ORIGIN/../lib",
                "-s",
            ],
            f"detc-run ({toolchain.architecture})",
        )
        staging.chmod(0o755)
        _publish(staging, built)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return built


# ---- packaging ---------------------------------------------------------------------------------


def _architecture(artifact: Artifact) -> str:
    machine = elf_machine(artifact.library_path)
    if machine not in ARCHITECTURES:
        raise BadInputError(
            f"{artifact.library_path} is built for ELF machine {machine}; detc package makes "
            f"bundles for {', '.join(ARCHITECTURES.values())}"
        )
    family = artifact.target().family
    if family not in ("x86", "arm"):
        raise BadInputError(
            f"{artifact.directory} is a {artifact.manifest.target_name} artifact; detc package "
            "makes CPU bundles (x86, arm) only"
        )
    return ARCHITECTURES[machine]


def _check_versions(artifact: Artifact, architecture: str) -> None:
    """model.so is read by the runtime of the TVM that wrote it; the bundle ships the host's."""
    built_with = artifact.manifest.other.get("versions", {})
    host = _host_tvm_versions()
    for key, label in (("tvm", "apache-tvm"), ("tvm_ffi", "apache-tvm-ffi")):
        wanted = built_with.get(key) if isinstance(built_with, dict) else None
        if wanted and str(wanted) != host[key]:
            raise BadInputError(
                f"{artifact.directory} was compiled with {label} {wanted}, this Python has "
                f"{host[key]}: the bundle's {architecture} runtime must be the one that compiled "
                "it; re-run detc compile"
            )


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise BadInputError(f"{out_dir} exists and is not a folder; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / BUNDLE_FILE).is_file():
        raise BadInputError(
            f"{out_dir} exists and is not a detc bundle (it holds other files); choose another "
            "output path or remove it"
        )


def _tsv_field(text: str, what: str) -> str:
    if any(c in text for c in "\t\n\r"):
        raise BadInputError(f"{what} {text!r} holds a tab or line break: the bundle cannot name it")
    return text


def _dims(shape: tuple[Any, ...]) -> str:
    """Sizes as digits; a named free dimension ("h", "w") by its name, any other as -1."""
    return ",".join(
        str(d) if isinstance(d, int) else d if isinstance(d, str) and d.isidentifier() else "-1"
        for d in shape
    )


def _takes_any_image(spec: TensorSpec) -> bool:
    """The image input of ``--with-preprocess``: uint8 (h, w, 3), height and width free."""
    shape = tuple(spec.shape)
    return (
        spec.dtype == "uint8"
        and len(shape) == 3
        and shape[2] == 3
        and all(isinstance(d, str) or (isinstance(d, int) and d > 0) for d in shape[:2])
    )


def _class_names(manifest: Manifest) -> list[str]:
    """The model spec's class names, when the manifest has them (else none)."""
    spec = manifest.other.get("model_spec")
    names = spec.get("class_names") if isinstance(spec, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return []
    return [_tsv_field(name, "class name") for name in names]


def _write_model(artifact: Artifact, model_dir: Path) -> list[dict[str, Any]]:
    """model.so, manifest.json, params/*.bin and io.tsv; returns the params' descriptions."""
    manifest = artifact.manifest
    shutil.copyfile(artifact.library_path, model_dir / "model.so")
    shutil.copyfile(manifest.path, model_dir / "manifest.json")
    lines = ["detc-bundle\t1", "library\tmodel/model.so"]
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            fixed = all(isinstance(d, int) and d > 0 for d in spec.shape)
            if kind == "input" and not fixed and not _takes_any_image(spec):
                raise BadInputError(
                    f"input '{spec.name}' has shape {list(spec.shape)}: a bundle needs fixed "
                    "input shapes (compile with --input-shape), or an image input of free "
                    "height and width (compile with --with-preprocess)"
                )
            name = _tsv_field(spec.name, f"{kind} name")
            lines.append(f"{kind}\t{name}\t{spec.dtype}\t{_dims(spec.shape)}")
    params = []
    params_dir = model_dir / "params"
    params_dir.mkdir()
    for index, value in enumerate(artifact.load_params()):
        file_name = f"params/p{index:05d}.bin"
        little_endian = value.astype(value.dtype.newbyteorder("<"), copy=False)
        np.ascontiguousarray(little_endian).tofile(model_dir / file_name)
        lines.append(f"param\t{value.dtype.name}\t{_dims(value.shape)}\tmodel/{file_name}")
        params.append({"file": f"model/{file_name}", "dtype": value.dtype.name})
    lines += [f"class\t{index}\t{name}" for index, name in enumerate(_class_names(manifest))]
    (model_dir / "io.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return params


def _write_sums(bundle: Path) -> None:
    files = sorted(
        path.relative_to(bundle).as_posix()
        for path in bundle.rglob("*")
        if path.is_file() and path.name != SUMS_FILE
    )
    lines = [f"{sha256_of(bundle / name)}  {name}" for name in files]
    (bundle / SUMS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def package_artifact(
    artifact_dir: Path | str,
    out_dir: Path | str,
    *,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Package the artifact in ``artifact_dir`` as a bundle folder ``out_dir`` (replaced
    atomically, as a build replaces an artifact); returns ``out_dir``.

    Errors: BadInputError (not an artifact, not a CPU artifact, a TVM version other than
    this Python's, ``out_dir`` holding something else), ToolchainMissingError (no C++ compiler
    for the architecture; for aarch64 also qemu and the aarch64 wheels the emulation
    environment needs).
    """
    artifact = Artifact.open(artifact_dir)
    artifact.check_library_digest()
    architecture = _architecture(artifact)
    _check_versions(artifact, architecture)
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    toolchain = _toolchain(architecture)
    if report is not None:
        report(f"detc: packaging {artifact.directory} for {architecture} into {out_dir}")
    runtime = _runtime_build(toolchain)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for folder in ("model", "lib", "bin", "include", "example", "python"):
            (staging / folder).mkdir()
        params = _write_model(artifact, staging / "model")
        shutil.copyfile(runtime / "lib" / RUNTIME_LIBRARY, staging / "lib" / RUNTIME_LIBRARY)
        for name in TVM_LIBRARIES:
            shutil.copyfile(toolchain.tvm_lib_dir / name, staging / "lib" / name)
        shutil.copyfile(runtime / RUNNER_FILE, staging / RUNNER_FILE)
        for header in (_HEADER, _PPM_HEADER):
            shutil.copyfile(RUNTIME_SOURCES / header, staging / "include" / header)
        for name in _EXAMPLE_FILES:
            shutil.copyfile(RUNTIME_SOURCES / name, staging / name)
        shutil.copyfile(RUNTIME_SOURCES / _DEVICE_README, staging / "README.md")
        shutil.copyfile(_PYTHON_LOADER, staging / PYTHON_LOADER_FILE)
        manifest = artifact.manifest
        document = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "architecture": architecture,
            "target": manifest.target_name,
            "runtime_api_version": RUNTIME_API_VERSION,
            "inputs": [
                {"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in manifest.inputs
            ],
            "outputs": [
                {"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in manifest.outputs
            ],
            "params": params,
            # the compiled-in stages (--with-preprocess / --with-nms), when there are any
            **({"prepost": manifest.other["prepost"]} if "prepost" in manifest.other else {}),
            "class_names": _class_names(manifest),
            "versions": {**_host_tvm_versions(), "detc": _detc_version()},
            "artifact_library_sha256": manifest.library_sha256,
        }
        (staging / BUNDLE_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        for path in staging.rglob("*"):
            executable = path.parent.name in ("bin", "lib") and path.is_file()
            path.chmod(0o755 if path.is_dir() or executable else 0o644)
        _write_sums(staging)
        (staging / SUMS_FILE).chmod(0o644)
        staging.chmod(0o755)
        replace_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _detc_version() -> str:
    try:
        return importlib.metadata.version("detc")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cmake_dir() -> Path:
    """The folder holding detc's CMake package (``detc_add_model``): what ``detc --cmake-dir``
    prints, for ``-Ddetc_DIR=...`` or ``CMAKE_PREFIX_PATH``."""
    return RUNTIME_SOURCES / "cmake"
