"""TVM per target (x86, arm, cuda): phases, tuning, export, runners. Imports TVM — lazily.

``import detc.targets`` is cheap: TVM is imported inside the functions that compile or run.

    build_artifact(model, "x86", out_dir, manifest_fields={...})  → manifest dict
    load_artifact(out_dir)(images=x)                               → {"output0": array}
    Artifact.open(out_dir).manifest                                → Manifest (checked)
    available_targets()                                            → [TargetInfo, ...]

How the code is organised:

    target.py, context.py   a Target: its named pipelines of phases, the BuildContext they share
    x86/, arm/              the targets (x86: blocked NCHW[x]c layout; arm: cross-compiled)
    artifact.py             writing an artifact directory, and reading it back (Artifact, Manifest)
    runtime.py              loading an artifact on this machine: CompiledModel
    tuning/                 the tune phase: options, tasks, search loop, database, int8 tiles
    remote/                 boards over RPC, qemu emulation of aarch64, the cross toolchain
    int8.py, precision.py   graph lowerings the phases apply (QDQ → int8 kernels, float16)
    cpu.py, builder.py      host CPU detection; MetaSchedule's persistent builder
    doctor.py               ``detc doctor``
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from detc.targets import arm as _arm  # noqa: F401  (registers the arm targets)
from detc.targets import cuda as _cuda  # noqa: F401  (registers the cuda targets)
from detc.targets import x86 as _x86  # noqa: F401  (registers the x86 target)
from detc.targets.artifact import (
    FORMAT,
    FORMAT_VERSION,
    Artifact,
    Manifest,
    build_artifact,
    read_manifest,
)
from detc.targets.bundle import package_artifact
from detc.targets.context import (
    LIBRARY_FILE,
    MANIFEST_FILE,
    PARAMS_FILE,
    PHASE_NAMES,
    BuildContext,
    Phase,
)
from detc.targets.cpu import HostCpu, detect_host_cpu
from detc.targets.doctor import ToolRecord, doctor
from detc.targets.remote.loopback import (
    LocalRpcServer,
    LocalRpcTracker,
    local_rpc_server,
    local_rpc_tracker,
)
from detc.targets.remote.rpc import rpc_batch_runner, rpc_time
from detc.targets.remote.session import (
    RpcDevice,
    RpcDeviceError,
    parse_device,
    tracker_device,
    tracker_servers,
)
from detc.targets.runtime import CompiledModel, configure_threads, load_artifact
from detc.targets.target import (
    Target,
    TargetInfo,
    available_targets,
    register_target,
    resolve_target,
)
from detc.targets.tuning.options import TuningOptions
from detc.targets.tuning.search import TuneResult, tune_model

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
    "Artifact",
    "BuildContext",
    "CompiledModel",
    "HostCpu",
    "LocalRpcServer",
    "LocalRpcTracker",
    "Manifest",
    "Phase",
    "RpcDevice",
    "RpcDeviceError",
    "Target",
    "TargetInfo",
    "ToolRecord",
    "TuneResult",
    "TuningOptions",
    "available_targets",
    "build_artifact",
    "configure_threads",
    "detect_host_cpu",
    "doctor",
    "emulated_batch_runner",
    "load_artifact",
    "local_rpc_server",
    "local_rpc_tracker",
    "package_artifact",
    "parse_device",
    "read_manifest",
    "register_target",
    "resolve_target",
    "rpc_batch_runner",
    "rpc_time",
    "tracker_device",
    "tracker_servers",
    "tune_model",
]
