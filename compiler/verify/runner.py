"""The two sides verification runs: the artifact (here, under qemu or on a board) and its reference
model in onnxruntime with the artifact's input shapes."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError
from detc.compiler.frontend import load_onnx_proto
from detc.compiler.reference import TensorSpec

BatchRunner = Callable[[Sequence[Mapping[str, np.ndarray]]], list[dict[str, np.ndarray]]]


def read_manifest(artifact_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The artifact's manifest, checked by :func:`detc.targets.read_manifest`; a folder without
    one is named as what it is, not a detc artifact."""
    # detc.targets is imported where it is used, here and below: `import detc` stays without it
    from detc.targets import MANIFEST_FILE
    from detc.targets import read_manifest as read_artifact_manifest

    if not (Path(artifact_dir) / MANIFEST_FILE).is_file():
        raise BadInputError(
            f"{artifact_dir}: no {MANIFEST_FILE} — not a detc artifact (run detc compile)"
        )
    return read_artifact_manifest(Path(artifact_dir))


def manifest_inputs(manifest: Mapping[str, Any]) -> list[TensorSpec]:
    return [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]


def is_cross_compiled(manifest: Mapping[str, Any]) -> bool:
    """True for artifacts this host cannot load natively (an aarch64 library on x86, ...)."""
    triple = str(manifest.get("target", {}).get("tvm_target", {}).get("mtriple", ""))
    host = platform.machine().lower()
    if not triple:
        return False
    arch = triple.split("-")[0]
    return not (arch == host or (arch in ("x86_64", "amd64") and host in ("x86_64", "amd64")))


def artifact_batch_runner(
    artifact_dir: str | os.PathLike[str],
    *,
    emulate: bool = False,
    device: str | None = None,
    num_threads: int | None = None,
) -> BatchRunner:
    """How to run an artifact here: in process, under qemu (``emulate``), or on RPC ``device``."""
    from detc.targets import emulated_batch_runner, load_artifact, rpc_batch_runner

    manifest = read_manifest(artifact_dir)
    if device is not None:
        return rpc_batch_runner(Path(artifact_dir), device)
    if emulate:
        return emulated_batch_runner(Path(artifact_dir))
    if is_cross_compiled(manifest):
        triple = manifest["target"]["tvm_target"].get("mtriple")
        raise BadInputError(
            f"{artifact_dir}: compiled for {triple}, which this machine cannot run natively; "
            "add --emulate (qemu) or --device rpc://HOST:PORT (a board)"
        )
    compiled = load_artifact(Path(artifact_dir), num_threads=num_threads)
    return lambda feeds_list: [compiled.run(f) for f in feeds_list]


def reference_proto(reference: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Any:
    """The reference model with the artifact's static input shapes applied (if it was dynamic)."""
    shapes = {s.name: tuple(int(d) for d in s.shape) for s in manifest_inputs(manifest)}
    proto, _ = load_onnx_proto(reference)
    initializers = {i.name for i in proto.graph.initializer}
    names = [v.name for v in proto.graph.input if v.name not in initializers]
    if sorted(names) != sorted(shapes):
        raise BadInputError(
            f"{reference}: inputs {names} do not match the artifact's {sorted(shapes)}: "
            "is this the model the artifact was compiled from?"
        )
    dynamic = any(
        not d.HasField("dim_value")
        for v in proto.graph.input
        if v.name in shapes
        for d in v.type.tensor_type.shape.dim
    )
    if dynamic:
        proto, _ = load_onnx_proto(reference, input_shapes=shapes)
    return proto
