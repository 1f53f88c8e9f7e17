"""``detc doctor``: every external tool and build feature detc can use, found or not, what it is
needed for and how to get it (imports TVM lazily)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from detc.compiler.errors import ToolchainMissingError
from detc.targets.cuda.toolkit import NVCC_INSTALL_HINT, find_nvcc, local_gpu, nvcc_release
from detc.targets.remote.emulator import emulation_env_status
from detc.targets.remote.toolchain import (
    CROSS_COMPILER_APT_LINE,
    HOST_COMPILER_APT_LINE,
    QEMU_APT_LINE,
    find_aarch64_cross_compiler,
    find_host_c_compiler,
    find_qemu_aarch64,
    tool_version,
)


def _binfmt_aarch64_state() -> str | None:
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    try:
        first = entry.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return f"{entry} ({first})"


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tvm_build_features() -> str | None:
    try:
        import tvm
        from tvm.support import libinfo
        from tvm.target import codegen
    except ImportError:
        return None
    info = libinfo()
    try:
        llvm = f"LLVM {codegen.llvm_version_major()}"
    except Exception:
        llvm = "no LLVM"
    return f"tvm {tvm.__version__}, {llvm}, CUDA {info.get('USE_CUDA', 'OFF')}"


@dataclass(frozen=True)
class ToolRecord:
    """One line of ``detc doctor``: a tool, what was found (None = missing), why, how to get it."""

    tool: str
    found: str | None
    needed_for: str
    install_hint: str

    @property
    def ok(self) -> bool:
        return self.found is not None


def doctor() -> list[ToolRecord]:
    """Every external tool and build feature detc can use, found or not (imports TVM lazily)."""
    host_cc = find_host_c_compiler()
    try:
        cross: str | None = find_aarch64_cross_compiler().describe()
    except ToolchainMissingError:
        cross = None
    qemu = find_qemu_aarch64()
    nvcc = find_nvcc()
    onnxruntime = _package_version("onnxruntime") or _package_version("onnxruntime-gpu")
    return [
        ToolRecord(
            "host C compiler",
            f"{host_cc} ({tool_version(host_cc)})" if host_cc else None,
            "linking x86 artifacts (export_library)",
            HOST_COMPILER_APT_LINE,
        ),
        ToolRecord(
            "aarch64 cross compiler",
            cross,
            "building ARM artifacts (--target arm)",
            CROSS_COMPILER_APT_LINE,
        ),
        ToolRecord(
            "qemu-aarch64",
            f"{qemu} ({tool_version(qemu)})" if qemu else None,
            "verifying ARM artifacts on an x86 machine (emulated, numerics only)",
            f"{QEMU_APT_LINE}   (or qemu-user-static)",
        ),
        ToolRecord(
            "binfmt aarch64 registration",
            _binfmt_aarch64_state(),
            "optional: running aarch64 binaries directly (detc calls qemu-aarch64 itself)",
            "sudo apt-get install qemu-user-static binfmt-support",
        ),
        ToolRecord(
            "aarch64 emulation environment",
            emulation_env_status(),
            "ARM verification; prepared automatically into the cache on first use",
            "detc prepares it itself (needs the cross compiler and pip access to PyPI)",
        ),
        ToolRecord(
            "TVM build",
            _tvm_build_features(),
            "every target (compiling)",
            "pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0",
        ),
        ToolRecord(
            "nvcc",
            f"{nvcc} ({nvcc_release(nvcc)})" if nvcc else None,
            "building CUDA artifacts (--target cuda: device code compiled to a fatbin)",
            NVCC_INSTALL_HINT,
        ),
        ToolRecord(
            "CUDA GPU",
            # not "missing": a build machine needs no GPU
            local_gpu() or "none on this machine (CUDA artifacts build here but run elsewhere)",
            "running CUDA artifacts (detc verify / bench); building needs none",
            "a machine with an NVIDIA GPU and its driver (nvidia-smi lists it)",
        ),
        ToolRecord(
            "onnxruntime",
            onnxruntime,
            "reference outputs for verification",
            "pip install onnxruntime",
        ),
    ]
