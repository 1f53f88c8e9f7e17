"""The CUDA toolkit on the build machine (nvcc) and the GPU on this one, if any.

nvcc is needed to build (the device code is compiled ahead of time into a fatbin); a GPU is
needed only to run. Neither lookup imports TVM unless asked about the GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from detc.compiler.errors import ToolchainMissingError

#: what detc tells a user without nvcc
NVCC_INSTALL_HINT = (
    "install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads) or point "
    "DETC_NVCC at nvcc"
)


def find_nvcc() -> str | None:
    """nvcc: $DETC_NVCC, then PATH, then $CUDA_HOME/bin and /usr/local/cuda/bin."""
    chosen = os.environ.get("DETC_NVCC")
    if chosen:
        return chosen if Path(chosen).is_file() else None
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def require_nvcc() -> str:
    """nvcc's path; ToolchainMissingError (exit 2) naming how to get it."""
    found = find_nvcc()
    if found is None:
        raise ToolchainMissingError(
            f"no CUDA compiler (nvcc) found to compile the GPU code: {NVCC_INSTALL_HINT}"
        )
    return found


def nvcc_release(path: str) -> str:
    """nvcc's release line ("Cuda compilation tools, release 13.0, V13.0.88")."""
    try:
        completed = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown version"
    # The first lines name the driver; the release is on a later one.
    for line in completed.stdout.splitlines():
        if "release" in line:
            return line.strip()
    return "unknown version"


def local_gpu() -> str | None:
    """This machine's first CUDA GPU ("NVIDIA H100 80GB HBM3, compute 9.0"), None without one
    (no GPU, no driver, or a TVM without the CUDA runtime)."""
    try:
        import tvm

        device = tvm.cuda(0)
        if not device.exist:
            return None
        return f"{device.device_name}, compute {device.compute_version}"
    except Exception:  # a missing libcuda surfaces as various TVM errors: all mean "no GPU"
        return None
