"""External tools detc needs beyond Python: C compilers, the aarch64 cross compiler, qemu.

`find_aarch64_cross_compiler()` picks the compiler that links ARM artifacts (Debian's
``aarch64-linux-gnu-gcc`` first, else clang with ``--target=aarch64-linux-gnu`` and an aarch64
sysroot); :func:`detc.targets.doctor.doctor` lists every tool, for ``detc doctor``.
Nothing here imports TVM.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from detc.compiler.errors import ToolchainMissingError

AARCH64_TRIPLE = "aarch64-linux-gnu"
CROSS_COMPILER_APT_LINE = "sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
QEMU_APT_LINE = "sudo apt-get install qemu-user"
HOST_COMPILER_APT_LINE = "sudo apt-get install gcc g++"

# Environment overrides, for toolchains outside PATH (e.g. a vendor SDK's gcc).
CROSS_CC_ENV = "DETC_AARCH64_CC"
CROSS_CXX_ENV = "DETC_AARCH64_CXX"
CROSS_SYSROOT_ENV = "DETC_AARCH64_SYSROOT"

# Where Debian's libc6-dev-arm64-cross puts the aarch64 sysroot; clang needs it explicitly.
_DEBIAN_AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")


@dataclass(frozen=True)
class CrossCompiler:
    """A C/C++ compiler pair that produces aarch64 Linux ELF objects and shared libraries."""

    kind: str  # "gcc" or "clang"
    cc: str  # absolute path of the C compiler (TVM's export_library links with it)
    cxx: str | None  # absolute path of the C++ compiler, None when not installed
    flags: tuple[str, ...]  # extra flags every invocation needs (clang: target, sysroot, linker)
    version: str

    def export_library_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``Executable.export_library`` that link with this compiler."""
        return {"cc": self.cc, "options": list(self.flags)}

    def describe(self) -> str:
        flags = f" {' '.join(self.flags)}" if self.flags else ""
        return f"{self.cc}{flags} ({self.kind} {self.version})"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def tool_version(path: str, flag: str = "--version") -> str:
    try:
        completed = subprocess.run(
            [path, flag], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown version"
    return _first_line(completed.stdout or completed.stderr) or "unknown version"


def _gcc_version(path: str) -> str:
    try:
        completed = subprocess.run(
            [path, "-dumpversion"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def _links_aarch64_shared_object(cc: str, flags: tuple[str, ...]) -> bool:
    """Whether `cc` can really link an aarch64 shared object (clang may lack sysroot or linker)."""
    with tempfile.TemporaryDirectory(prefix="detc-cc-probe-") as tmp:
        source = Path(tmp) / "probe.c"
        output = Path(tmp) / "probe.so"
        source.write_text("int detc_probe(int x) { return x + 1; }\n")
        try:
            completed = subprocess.run(
                [cc, *flags, "-shared", "-fPIC", "-o", str(output), str(source)],
                capture_output=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return completed.returncode == 0 and elf_machine(output) == EM_AARCH64


EM_AARCH64 = 183
EM_X86_64 = 62


def elf_machine(path: Path) -> int | None:
    """The ELF header's e_machine (183 = aarch64, 62 = x86-64); None if `path` is not ELF."""
    with open(path, "rb") as file:
        header = file.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    if header[5] == 1:  # EI_DATA: 1 little-endian, 2 big-endian
        return int.from_bytes(header[18:20], "little")
    return int.from_bytes(header[18:20], "big")


def _clang_cross_compiler() -> CrossCompiler | None:
    clang = shutil.which("clang")
    if clang is None:
        return None
    sysroot = Path(os.environ.get(CROSS_SYSROOT_ENV, _DEBIAN_AARCH64_SYSROOT))
    if not (sysroot / "lib").is_dir():
        return None
    flags: tuple[str, ...] = (f"--target={AARCH64_TRIPLE}", f"--sysroot={sysroot}")
    # The host's ld cannot link aarch64 objects; lld can, when installed.
    if shutil.which("ld.lld"):
        flags = (*flags, "-fuse-ld=lld")
    if not _links_aarch64_shared_object(clang, flags):
        return None
    clangxx = shutil.which("clang++")
    return CrossCompiler("clang", clang, clangxx, flags, tool_version(clang))


@functools.lru_cache(maxsize=1)
def _discover_aarch64_cross_compiler() -> CrossCompiler | None:
    explicit_cc = os.environ.get(CROSS_CC_ENV)
    if explicit_cc:
        cc = shutil.which(explicit_cc)
        if cc is None:
            return None
        explicit_cxx = os.environ.get(CROSS_CXX_ENV)
        cxx = shutil.which(explicit_cxx) if explicit_cxx else None
        kind = "clang" if "clang" in Path(cc).name else "gcc"
        return CrossCompiler(kind, cc, cxx, (), _gcc_version(cc))
    gcc = shutil.which(f"{AARCH64_TRIPLE}-gcc")
    if gcc is not None:
        gxx = shutil.which(f"{AARCH64_TRIPLE}-g++")
        return CrossCompiler("gcc", gcc, gxx, (), _gcc_version(gcc))
    return _clang_cross_compiler()


def find_aarch64_cross_compiler(*, require_cxx: bool = False) -> CrossCompiler:
    """The aarch64 cross compiler; `ToolchainMissingError` (exit 2) with the install line if none.

    `require_cxx` also demands the C++ compiler (building the emulation runner needs it).
    The result is cached per process; `clear_toolchain_cache()` forgets it (tests change PATH).
    """
    found = _discover_aarch64_cross_compiler()
    if found is None:
        where = (
            f"${CROSS_CC_ENV}={os.environ[CROSS_CC_ENV]} is not an executable"
            if os.environ.get(CROSS_CC_ENV)
            else f"no {AARCH64_TRIPLE}-gcc (or clang with an aarch64 sysroot) on PATH"
        )
        raise ToolchainMissingError(
            f"aarch64 cross compiler not found ({where}): "
            f"install it with `{CROSS_COMPILER_APT_LINE}`"
        )
    if require_cxx and found.cxx is None:
        raise ToolchainMissingError(
            f"aarch64 C++ cross compiler not found next to {found.cc}: "
            f"install it with `{CROSS_COMPILER_APT_LINE}`"
        )
    return found


def clear_toolchain_cache() -> None:
    """Forget discovered tools (after PATH or the DETC_AARCH64_* variables changed)."""
    _discover_aarch64_cross_compiler.cache_clear()


def find_qemu_aarch64() -> str | None:
    """Path of the qemu user-mode emulator for aarch64 (qemu-user or qemu-user-static), or None."""
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def require_qemu_aarch64() -> str:
    """`find_qemu_aarch64()` or `ToolchainMissingError` (exit 2) with the install line."""
    qemu = find_qemu_aarch64()
    if qemu is None:
        raise ToolchainMissingError(
            "qemu-aarch64 not found: ARM artifacts are verified under emulation on this machine; "
            f"install it with `{QEMU_APT_LINE}` (or qemu-user-static)"
        )
    return qemu


def find_host_c_compiler() -> str | None:
    """The host C compiler TVM links native (x86) libraries with: $CC, cc, gcc or clang."""
    candidates = [os.environ.get("CC"), "cc", "gcc", "clang"]
    for candidate in candidates:
        if candidate and (path := shutil.which(candidate)):
            return path
    return None
