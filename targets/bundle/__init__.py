"""Bundles: an artifact packaged with everything a device needs to run it (``detc package``).

    package_artifact(artifact_dir, out_dir)  → out_dir (the bundle folder)
    Bundle.open(bundle_dir)                  → Bundle (every file checked against SHA256SUMS)
    detections_from_outputs(outputs)         → a --with-nms model's outputs as detc-run prints them
    cmake_dir()                              → the folder of detc's CMake package

The C/C++ sources compiled into each bundle (the C API ``detc_runtime.h``, the runner
``detc-run``, the example application), the device README and the CMake module live in
``runtime/``.
"""

from __future__ import annotations

from detc.targets.bundle.detections import detections_from_outputs, gives_detections
from detc.targets.bundle.package import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    Bundle,
    BundleIntegrityError,
    cmake_dir,
    package_artifact,
)

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "Bundle",
    "BundleIntegrityError",
    "cmake_dir",
    "detections_from_outputs",
    "gives_detections",
    "package_artifact",
]
