"""What the phases of one build share: the :class:`BuildContext`, and the names of the files
export writes into the artifact.

A leaf module (it imports no other part of detc.targets): the target, the tune phase and the
artifact reader all depend on it, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from detc.targets.tuning.options import TuningOptions

MANIFEST_FILE = "manifest.json"
LIBRARY_FILE = "model.so"
PARAMS_FILE = "params.npz"
PHASE_NAMES = ("import", "legalize", "tune", "prepost", "build", "export")
#: the image input of an artifact with compiled preprocessing: height, width free, RGB
IMAGE_INPUT = "image"
IMAGE_INPUT_SHAPE = ("h", "w", 3)
#: the outputs of a ``--with-nms`` artifact, in order: (name, dtype, rank); rows at and after
#: ``count`` are zero (the bundle's C runtime and detc-run read them by these names)
NMS_OUTPUTS = (
    ("boxes", "float32", 2),
    ("scores", "float32", 1),
    ("classes", "int32", 1),
    ("count", "int32", 1),
)
#: the phase that wraps the network in compiled pre/post-processing (only when asked for)
PREPOST_PHASE = "prepost"


def param_key(index: int) -> str:
    """Key of the ``index``-th parameter (in ``main``'s order after the inputs) in params.npz."""
    return f"p{index:05d}"


@dataclass(frozen=True)
class PrepostRequest:
    """What ``--with-preprocess`` / ``--with-nms`` ask a build to compile around the network,
    and the model spec (a ``detc.compiler.detection.spec.ModelSpec``) that says how."""

    preprocess: bool
    nms: bool
    spec: Any

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``prepost`` key (the contract of issue #20)."""
        height, width = self.spec.input_size
        return {
            "preprocess": self.preprocess,
            "nms": self.nms,
            "max_detections": int(self.spec.max_detections),
            "input_size": [int(height), int(width)],
        }


@dataclass
class BuildContext:
    """The state the phases of one build share; each phase reads what earlier phases left."""

    model: onnx.ModelProto
    staging_dir: Path  # the directory export writes into (renamed into place by the caller)
    num_threads: int
    progress: Callable[[str], None]  # progress lines (the caller may drop them)
    warn: Callable[[str], None]  # notices the user must see (e.g. "untuned")
    #: None: an untuned build with TVM's default schedules
    tuning: TuningOptions | None = None
    #: which of the target's named pipelines runs (None: its first); see Target.pipeline_for
    pipeline: str | None = None
    #: the arithmetic asked for, one of the target's ``precisions`` (None: as the model is)
    precision: str | None = None
    tvm_target: Any = None  # tvm.target.Target, set before the first phase
    mod: Any = None  # tvm.IRModule, from import on
    params: list[np.ndarray] = field(default_factory=list)  # main's arguments after the inputs
    num_inputs: int = 0
    executable: Any = None  # relax.Executable, from build on
    #: seconds of the --tune-minutes budget spent searching before the tune phase (int8 tiles)
    searched_seconds: float = 0.0
    #: compiled pre/post-processing around the network (None: the network alone)
    prepost: PrepostRequest | None = None
    #: manifest entries the phases own ("tuning", "precision", ...)
    manifest: dict[str, Any] = field(default_factory=dict)
    #: (phase name, seconds, summary) for every phase that ran
    timings: list[tuple[str, float, str]] = field(default_factory=list)

    def reset_for_rebuild(self) -> None:
        """Forget what the phases built, to run another pipeline on the same model from its
        start (the staging folder, threads and callbacks stay)."""
        self.mod, self.params, self.num_inputs, self.executable = None, [], 0, None
        self.searched_seconds = 0.0
        self.manifest.clear()
        self.timings.clear()


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[BuildContext], str]
