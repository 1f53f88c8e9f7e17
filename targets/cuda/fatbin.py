"""Device code compiled ahead of time: CUDA C → fatbin → embedded in ``model.so``.

Why not TVM's own path: TVM compiles CUDA C only when its CUDA runtime is loaded (a machine with
the NVIDIA driver), and then by default through NVRTC into a cubin for the GPU it finds. On a
build machine without a GPU its codegen keeps the CUDA *source* in the module, and the library
would need a compiler wherever it is loaded. So the build forces that source-keeping path on
every machine (the same artifact whether or not a GPU is present), and export compiles the
source with nvcc into a fatbin for the preset's architectures and puts it where the source was.

The packed module tree export_library embeds (``runtime.ModulePackImportsToTensor``) is
``<u64 size> <u64-vector row_ptr> <u64-vector children> (<str kind> [<str payload>])*``; a CUDA
module's payload is ``<str fmt> <function map> <str code>`` (strings: u64 length + bytes). The
CUDA runtime hands ``code`` to ``cuModuleLoadData``, which takes a fatbin as it takes PTX, so
only ``fmt`` and ``code`` change; the function map (kernel names, argument types, launch
parameters) is kept byte for byte.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detc.compiler.errors import UnsupportedModelError

FATBIN_MAGIC = 0xBA55ED50
_FATBIN_HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries
_ENTRY_HEADER = struct.Struct("<HHIQ")  # kind, version, header size, payload size
_ENTRY_ARCH_OFFSET = 28  # the sm number (90 for sm_90), a u32 in each entry header
_ENTRY_KINDS = {1: "ptx", 2: "sass"}
_U64 = struct.Struct("<Q")
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")

#: flags TVM's generated CUDA C needs (half/bfloat16 operators it uses without the headers'
#: opt-in macros); no --use_fast_math: the artifact is verified against the fp32 reference
_NVCC_FLAGS = (
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "-w",  # TVM's code declares index variables it does not use: pages of warnings
)


@dataclass(frozen=True)
class FatbinEntry:
    kind: str  # "sass" (machine code) or "ptx"
    arch: str  # "sm_90"


def gencode_flags(sass: tuple[str, ...], ptx_arch: str) -> list[str]:
    """nvcc flags for SASS of every architecture in ``sass`` plus PTX for ``ptx_arch``."""
    flags = []
    for arch in sass:
        flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    flags += ["-gencode", f"arch=compute_{ptx_arch[3:]},code=compute_{ptx_arch[3:]}"]
    return flags


def kernel_count(source: str) -> int:
    """The kernels CUDA C ``source`` defines (each is declared once more at the top)."""
    return len(set(_KERNEL.findall(source)))


def compile_fatbin(source: str, nvcc: str, sass: tuple[str, ...], ptx_arch: str) -> bytes:
    """nvcc ``source`` (TVM's CUDA C) into a fatbin; UnsupportedModelError with nvcc's first
    error line when it fails."""
    with tempfile.TemporaryDirectory(prefix="detc-cuda-") as workspace:
        code, fatbin = Path(workspace) / "kernels.cu", Path(workspace) / "kernels.fatbin"
        code.write_text(source)
        threads = str(min(len(sass) + 1, os.cpu_count() or 1))
        command = [
            nvcc,
            "--fatbin",
            *_NVCC_FLAGS,
            "--threads",
            threads,
            *gencode_flags(sass, ptx_arch),
            "-o",
            str(fatbin),
            str(code),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            errors = [line for line in completed.stderr.splitlines() if "error" in line]
            first = (errors or completed.stderr.strip().splitlines() or ["no output"])[0]
            raise UnsupportedModelError(
                f"nvcc could not compile TVM's CUDA code for {', '.join(sass)}: {first[:300]}"
            )
        return fatbin.read_bytes()


def fatbin_entries(data: bytes) -> list[FatbinEntry]:
    """The code objects of every fatbin found in ``data`` (a fatbin, or a library embedding
    one), in order."""
    entries = []
    start = data.find(struct.pack("<I", FATBIN_MAGIC))
    while start != -1 and start + _FATBIN_HEADER.size <= len(data):
        _, _, header_size, size = _FATBIN_HEADER.unpack_from(data, start)
        offset, end = start + header_size, start + header_size + size
        while offset + _ENTRY_HEADER.size <= min(end, len(data)):
            kind, _, entry_header, payload = _ENTRY_HEADER.unpack_from(data, offset)
            if entry_header < _ENTRY_ARCH_OFFSET + 4:
                break  # not a fatbin entry after all (the magic can occur by chance)
            (arch,) = struct.unpack_from("<I", data, offset + _ENTRY_ARCH_OFFSET)
            entries.append(FatbinEntry(_ENTRY_KINDS.get(kind, f"kind {kind}"), f"sm_{arch}"))
            offset += entry_header + payload
        start = data.find(struct.pack("<I", FATBIN_MAGIC), max(end, start + 4))
    return entries


def library_fatbin_entries(library: Path) -> list[FatbinEntry]:
    """What :func:`fatbin_entries` finds in the file ``library`` (e.g. an artifact's model.so)."""
    return fatbin_entries(Path(library).read_bytes())


# ---- the packed module tree ----------------------------------------------------------------


def _read_u64(blob: bytes, offset: int) -> tuple[int, int]:
    return _U64.unpack_from(blob, offset)[0], offset + _U64.size


def _read_string(blob: bytes, offset: int) -> tuple[bytes, int]:
    length, offset = _read_u64(blob, offset)
    if offset + length > len(blob):
        raise ValueError("string runs past the end")
    return blob[offset : offset + length], offset + length


def _string(value: bytes) -> bytes:
    return _U64.pack(len(value)) + value


def _modules(blob: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(kind, payload start, payload end) of each serialized module of a packed tree (without
    its leading u64 size)."""
    groups, offset = _read_u64(blob, 0)
    offset += groups * _U64.size  # row pointers: one per module group, plus one
    children, offset = _read_u64(blob, offset)
    offset += children * _U64.size
    for _ in range(groups - 1):
        kind, offset = _read_string(blob, offset)
        if kind == b"_lib":  # the host library itself: no payload
            continue
        _, end = _read_string(blob, offset)
        yield kind, offset + _U64.size, end
        offset = end


def replace_cuda_code(packed: bytes, source: str, fatbin: bytes) -> bytes:
    """``packed`` (runtime.ModulePackImportsToTensor's bytes) with the CUDA module whose code
    is ``source`` holding ``fatbin`` instead. ValueError when the layout is not the expected
    one (a TVM whose format changed): detc must not write a library that fails on the GPU."""
    size, _ = _read_u64(packed, 0)
    tree = packed[_U64.size :]
    if size != len(tree):
        raise ValueError(f"packed size {size} != {len(tree)} bytes")
    expected_tail = _string(source.encode())
    for kind, start, end in _modules(tree):
        payload = tree[start:end]
        if kind != b"cuda" or not payload.endswith(expected_tail):
            continue
        fmt, fmap_start = _read_string(payload, 0)
        if fmt != b"cuda":
            raise ValueError(f"the CUDA module is already compiled (format {fmt.decode()!r})")
        function_map = payload[fmap_start : len(payload) - len(expected_tail)]
        new_payload = _string(b"fatbin") + function_map + _string(fatbin)
        new_tree = tree[: start - _U64.size] + _string(new_payload) + tree[end:]
        return _U64.pack(len(new_tree)) + new_tree
    raise ValueError("no CUDA module holding the generated source")


# ---- export_library's hook -------------------------------------------------------------------


def cuda_source_modules(module: Any) -> list[Any]:
    """Every CUDA module in ``module``'s import tree that holds source (TVM's fallback)."""
    found, stack, seen = [], [module], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.kind == "cuda":
            found.append(current)
        stack.extend(current.imports)
    return found


def _host_target_string(module: Any) -> str | None:
    stack = [module]
    while stack:
        current = stack.pop()
        if current.kind == "llvm":
            return str(current.get_function("_get_target_string")())
        stack.extend(current.imports)
    return None


@dataclass
class FatbinPacker:
    """``export_library(fpack_imports=packer)``: packs the imported modules as TVM would, with
    each CUDA module's source replaced by its nvcc-compiled fatbin. Records what it compiled."""

    nvcc: str
    sass: tuple[str, ...]
    ptx_arch: str
    kernels: int = 0
    fatbin_bytes: int = 0
    entries: list[FatbinEntry] = field(default_factory=list)

    def __call__(self, module: Any, is_system_lib: bool, prefix: str, workspace: str) -> str:
        import tvm

        packed = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy())
        for cuda_module in cuda_source_modules(module):
            source = str(cuda_module.inspect_source(""))
            fatbin = compile_fatbin(source, self.nvcc, self.sass, self.ptx_arch)
            try:
                packed = replace_cuda_code(packed, source, fatbin)
            except ValueError as err:
                raise UnsupportedModelError(
                    f"cannot embed the CUDA fatbin in model.so ({err}): this TVM's module format "
                    "is not the one detc knows"
                ) from err
            self.kernels += kernel_count(source)
            self.fatbin_bytes += len(fatbin)
            self.entries.extend(fatbin_entries(fatbin))
        target = _host_target_string(module)
        if target is None:
            raise UnsupportedModelError("no host (LLVM) module to embed the CUDA code in")
        blob_module = tvm.get_global_func("codegen.codegen_blob")(
            packed, is_system_lib, target, prefix
        )
        path = os.path.join(workspace, f"{prefix}devc.o")
        blob_module.write_to_file(path)
        return path
