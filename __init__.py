"""detc — a deployment compiler for object detectors.

ONNX or PyTorch in; a per-target TVM binary out, verified against the float reference.
The public Python API lives here; see README.md for the CLI.
"""

from __future__ import annotations

import os

# onnxruntime writes a device id and a telemetry database under ~/.cache/Microsoft when it is
# imported unless this is set first; detc writes nothing outside the outputs it is asked for.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from detc.compiler import *  # noqa: F403  (the public API is defined in detc.compiler)
from detc.compiler import __all__ as _compiler_all

__version__ = "0.1.0"
__all__ = ["__version__", *_compiler_all]
