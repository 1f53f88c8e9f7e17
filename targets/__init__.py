"""TVM per target (x86, arm, cuda): phases, tuning, export, runners. Imports TVM — lazily.

``import detc.targets`` is cheap: TVM is imported inside the functions that compile or run.

    build_artifact(model, "x86", out_dir, manifest_fields={...})  → manifest dict
    load_artifact(out_dir)(images=x)                               → {"output0": array}
    available_targets()                                            → [TargetInfo, ...]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from detc.targets import arm as _arm  # noqa: F401  (registers the arm targets)
from detc.targets import x86 as _x86  # noqa: F401  (registers the x86 target)
from detc.targets.artifact import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    build_artifact,
    read_manifest,
)
from detc.targets.cpu import HostCpu, detect_host_cpu
from detc.targets.remote.rpc import (
    RpcDevice,
    RpcDeviceError,
    local_rpc_server,
    local_rpc_tracker,
    parse_device,
    rpc_batch_runner,
    rpc_time,
    tracker_device,
    tracker_servers,
)
from detc.targets.remote.toolchain import ToolRecord, doctor
from detc.targets.runtime import CompiledModel, configure_threads, load_artifact
from detc.targets.target import (
    LIBRARY_FILE,
    PARAMS_FILE,
    PHASE_NAMES,
    BuildContext,
    Phase,
    Target,
    TargetInfo,
    available_targets,
    register_target,
    resolve_target,
)

BatchRunner = Callable[[Sequence[Mapping[str, np.ndarray]]], list[dict[str, np.ndarray]]]


def emulated_batch_runner(artifact_dir: Path) -> BatchRunner:
    """Run a cross-compiled (aarch64) artifact under qemu-user: numerics only, never latency."""
    from detc.targets.remote.emulator import run_emulated_batch

    return lambda feed_sets: run_emulated_batch(artifact_dir, list(feed_sets))


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LIBRARY_FILE",
    "MANIFEST_FILE",
    "PARAMS_FILE",
    "PHASE_NAMES",
    "BuildContext",
    "CompiledModel",
    "HostCpu",
    "Phase",
    "RpcDevice",
    "RpcDeviceError",
    "Target",
    "TargetInfo",
    "ToolRecord",
    "available_targets",
    "build_artifact",
    "configure_threads",
    "detect_host_cpu",
    "doctor",
    "emulated_batch_runner",
    "load_artifact",
    "local_rpc_server",
    "local_rpc_tracker",
    "parse_device",
    "read_manifest",
    "register_target",
    "resolve_target",
    "rpc_batch_runner",
    "rpc_time",
    "tracker_device",
    "tracker_servers",
]
