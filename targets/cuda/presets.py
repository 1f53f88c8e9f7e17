"""The CUDA architectures detc compiles for: ``cuda`` (portable) and ``cuda:sm_XX`` presets.

A preset names the architecture TVM generates code for (``arch``, which decides what the dlight
schedules may use: tensor cores from sm_70 on) and the architectures nvcc puts machine code
(SASS) for into the fatbin. Each fatbin also carries PTX for the codegen architecture, so a GPU
newer than every SASS entry can still JIT it; the GPUs a preset names load SASS and need no
compiler where the model runs.

No TVM here: ``detc targets`` lists the presets without importing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from detc.compiler.errors import BadInputError


@dataclass(frozen=True)
class CudaPreset:
    """One ``--target cuda[:sm_XX]`` choice."""

    name: str  # what --target accepts
    arch: str  # TVM's codegen architecture ("sm_90")
    sass: tuple[str, ...]  # architectures with machine code in the fatbin
    host_machine: str | None  # the host CPU the library is for; None: the machine detc runs on
    gpus: str
    enables: str

    @property
    def compute_capability(self) -> int:
        return int(self.arch.removeprefix("sm_"))


# What the hardware offers; whether a kernel uses it is the schedule's choice (dlight's Matmul
# rule uses fp16/int8 tensor cores, WMMA, on sm_70 and newer).
_TURING = "fp16 tensor cores (WMMA), int8 dp4a and int8 tensor cores"
_AMPERE = "fp16/bf16/tf32 tensor cores, int8 dp4a, async copy"

CUDA_PRESETS: Mapping[str, CudaPreset] = {
    preset.name: preset
    for preset in (
        CudaPreset(
            "cuda",
            "sm_75",
            ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90"),
            None,
            "any NVIDIA GPU from Turing on (T4, A100, RTX 30/40, L4, H100)",
            f"code generated for sm_75 ({_TURING}); SASS for sm_75/80/86/89/90",
        ),
        CudaPreset(
            "cuda:sm_75",
            "sm_75",
            ("sm_75",),
            None,
            "Turing: T4, RTX 20xx",
            f"SASS sm_75: {_TURING}",
        ),
        CudaPreset(
            "cuda:sm_80", "sm_80", ("sm_80",), None, "Ampere: A100, A30", f"SASS sm_80: {_AMPERE}"
        ),
        CudaPreset(
            "cuda:sm_86",
            "sm_86",
            ("sm_86",),
            None,
            "Ampere: RTX 30xx, A10, A40, A2",
            f"SASS sm_86: {_AMPERE}",
        ),
        CudaPreset(
            "cuda:sm_87",
            "sm_87",
            ("sm_87",),
            "aarch64",
            "Jetson AGX Orin / Orin NX / Orin Nano (aarch64 host)",
            f"SASS sm_87: {_AMPERE}; host code cross-compiled for aarch64",
        ),
        CudaPreset(
            "cuda:sm_89",
            "sm_89",
            ("sm_89",),
            None,
            "Ada: L4, L40, RTX 40xx",
            f"SASS sm_89: {_AMPERE}, fp8 tensor cores",
        ),
        CudaPreset(
            "cuda:sm_90",
            "sm_90",
            ("sm_90",),
            None,
            "Hopper: H100, H200, GH200",
            f"SASS sm_90: {_AMPERE}, fp8 tensor cores, TMA, thread-block clusters",
        ),
    )
}


def get_cuda_preset(name: str) -> CudaPreset:
    """The preset ``name`` ("cuda", "cuda:sm_90"); BadInputError listing the others."""
    preset = CUDA_PRESETS.get(name)
    if preset is None:
        raise BadInputError(
            f"unknown CUDA target '{name}': choose one of {', '.join(CUDA_PRESETS)}"
        )
    return preset
