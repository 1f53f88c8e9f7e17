"""Verification: run an artifact and onnxruntime on the same inputs and compare what comes out."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler._errors import BadInputError
from detc.compiler._ort import (
    TensorSpec,
    load_feeds,
    ort_session,
    random_feeds,
    run_session,
)
from detc.compiler.frontend import load_onnx_proto
from detc.compiler.tensor_compare import TensorDiff, compare_outputs

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
BatchRunner = Callable[[Sequence[Mapping[str, np.ndarray]]], list[dict[str, np.ndarray]]]


def read_manifest(artifact_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(artifact_dir) / "manifest.json"
    if not path.is_file():
        raise BadInputError(
            f"{artifact_dir}: no manifest.json — not a detc artifact (run detc compile)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: unreadable manifest ({exc}); re-run detc compile") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "detc-artifact":
        raise BadInputError(f"{path}: not a detc artifact manifest; re-run detc compile")
    return manifest


def manifest_inputs(manifest: Mapping[str, Any]) -> list[TensorSpec]:
    return [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]


def is_cross_compiled(manifest: Mapping[str, Any]) -> bool:
    """True for artifacts this host cannot load natively (an aarch64 library on x86, ...)."""
    import platform

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
    manifest = read_manifest(artifact_dir)
    if device is not None:
        from detc.targets import rpc_batch_runner

        return rpc_batch_runner(Path(artifact_dir), device)
    if emulate:
        from detc.targets import emulated_batch_runner

        return emulated_batch_runner(Path(artifact_dir))
    if is_cross_compiled(manifest):
        triple = manifest["target"]["tvm_target"].get("mtriple")
        raise BadInputError(
            f"{artifact_dir}: compiled for {triple}, which this machine cannot run natively; "
            "add --emulate (qemu) or --device rpc://HOST:PORT (a board)"
        )
    from detc.compiler.driver import load

    compiled = load(artifact_dir, num_threads=num_threads)
    return lambda feeds_list: [compiled.run(f) for f in feeds_list]


def reference_proto(reference: str | os.PathLike[str], manifest: Mapping[str, Any]):
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


@dataclass
class TensorReport:
    """Per-output differences between an artifact and onnxruntime over one or more input sets."""

    diffs: list[TensorDiff]
    inputs: str
    emulated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.within_tolerance for d in self.diffs)

    def table(self) -> str:
        header = (
            f"{'output':<24} {'shape':<18} {'max abs':>10} {'max rel':>10} {'cosine':>10}  verdict"
        )
        lines = [header, "-" * len(header)]
        for d in self.diffs:
            verdict = "ok" if d.within_tolerance else f"MISMATCH (rtol {d.rtol}, atol {d.atol})"
            shape = "x".join(map(str, d.shape))
            lines.append(
                f"{d.name[:24]:<24} {shape:<18} {d.max_abs_error:>10.3e} "
                f"{d.max_rel_error:>10.3e} {d.cosine_similarity:>10.6f}  {verdict}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "inputs": self.inputs,
            "emulated": self.emulated,
            "notes": self.notes,
            "outputs": [d.to_dict() for d in self.diffs],
        }


def _merge(per_run: list[list[TensorDiff]]) -> list[TensorDiff]:
    """Worst case over runs, output by output."""
    merged: list[TensorDiff] = []
    for diffs in zip(*per_run, strict=True):
        worst = max(diffs, key=lambda d: (not d.within_tolerance, d.max_abs_error))
        merged.append(
            TensorDiff(
                worst.name,
                worst.shape,
                worst.dtype,
                max(d.max_abs_error for d in diffs),
                max(d.max_rel_error for d in diffs),
                min(d.cosine_similarity for d in diffs),
                worst.rtol,
                worst.atol,
                all(d.within_tolerance for d in diffs),
            )
        )
    return merged


def verify_tensors(
    artifact_dir: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    *,
    inputs: str | None = None,
    seed: int = 0,
    runs: int = 1,
    num_threads: int | None = None,
    emulate: bool = False,
    device: str | None = None,
) -> TensorReport:
    """Run the artifact and the reference in onnxruntime on the same inputs; compare every output.

    Inputs come from ``inputs`` (an .npz keyed by input name) or are seeded random (``runs`` sets,
    seeds ``seed``, ``seed+1``, ...).
    """
    manifest = read_manifest(artifact_dir)
    specs = manifest_inputs(manifest)
    if inputs is not None:
        feed_sets = [load_feeds(inputs, specs)]
        described = inputs
    else:
        feed_sets = [random_feeds(specs, seed + i) for i in range(runs)]
        described = f"seeded random (seed {seed}, {runs} set{'s' if runs > 1 else ''})"
    session = ort_session(reference_proto(reference, manifest), threads=num_threads or 0)
    expected = [run_session(session, f) for f in feed_sets]
    runner = artifact_batch_runner(
        artifact_dir, emulate=emulate, device=device, num_threads=num_threads
    )
    actual = runner(feed_sets)
    per_run = [compare_outputs(a, e) for a, e in zip(actual, expected, strict=True)]
    report = TensorReport(_merge(per_run), described, emulated=emulate)
    if emulate:
        report.notes.append("emulated: numerics only (no latency is measured under emulation)")
    return report
