"""``detc verify --data``: the artifact and its reference on every image, compared as detections."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler._errors import BadInputError
from detc.compiler._ort import ort_session, run_session
from detc.compiler.datasets import CocoDataset
from detc.compiler.detection_report import DetectionReport, evaluate_detection
from detc.compiler.modelspec import ModelSpec, spec_from_onnx
from detc.compiler.verify import artifact_batch_runner, reference_proto


def _spec_for(manifest: Mapping[str, Any], reference: Any, decoder: str | None) -> ModelSpec:
    stored = manifest.get("model_spec")
    spec = ModelSpec.from_dict(stored) if stored else spec_from_onnx(reference)
    if decoder is not None:
        spec = spec.with_overrides(decoder=decoder)
    if not spec.decoder:
        raise BadInputError(
            "the artifact's manifest names no decoder: give --decoder (yolov5, yolov8, yolox, demo "
            "or module:function)"
        )
    return spec


def _tensor_key(feeds: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha1()
    for name in sorted(feeds):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(feeds[name]).tobytes())
    return digest.hexdigest()


def verify_detection(
    artifact: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    data: str | os.PathLike[str],
    *,
    decoder: str | None = None,
    max_images: int | None = None,
    emulate: bool = False,
    device: str | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> DetectionReport:
    """Run both on every image of a COCO dataset: mAP of each, box agreement, tensor diffs."""
    ref_proto = reference_proto(reference, manifest)
    spec = _spec_for(manifest, ref_proto, decoder)
    dataset = CocoDataset(Path(data), spec)
    session = ort_session(ref_proto, threads=num_threads or 0)
    batch = artifact_batch_runner(artifact, emulate=emulate, device=device, num_threads=num_threads)
    label = "detc"
    if emulate or device is not None:
        # Each emulated (or remote) call pays a process start / upload: run every image in one
        # batch first, then hand the outputs to the per-image evaluation by content.
        feed_list = [{spec.input_name: s.tensor} for s in dataset.samples(spec, max_images)]
        outputs = batch(feed_list)
        precomputed = {_tensor_key(f): o for f, o in zip(feed_list, outputs, strict=True)}
        label = "detc (emulated: numerics only)" if emulate else f"detc ({device})"

        def candidate(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return precomputed[_tensor_key(feeds)]
    else:

        def candidate(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return batch([feeds])[0]

    return evaluate_detection(
        lambda feeds: run_session(session, feeds),
        candidate,
        dataset,
        spec,
        spec.decoder,
        max_images=max_images,
        progress=progress,
        reference_label=f"onnxruntime ({Path(reference).name})",
        candidate_label=label,
        # an emulated run proves numerics only: its time must never be read as latency
        time_candidate=not emulate,
    )
