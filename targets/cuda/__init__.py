"""NVIDIA GPUs: presets per architecture, dlight schedules, fp16, a fatbin built ahead of time."""

from __future__ import annotations

from detc.targets.cuda.fatbin import FatbinEntry, fatbin_entries, library_fatbin_entries
from detc.targets.cuda.presets import CUDA_PRESETS, CudaPreset, get_cuda_preset
from detc.targets.cuda.target import CudaOnAarch64Target, CudaTarget
from detc.targets.cuda.toolkit import find_nvcc, local_gpu

__all__ = [
    "CUDA_PRESETS",
    "CudaOnAarch64Target",
    "CudaPreset",
    "CudaTarget",
    "FatbinEntry",
    "fatbin_entries",
    "find_nvcc",
    "get_cuda_preset",
    "library_fatbin_entries",
    "local_gpu",
]
