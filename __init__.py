"""detc — a deployment compiler for object detectors.

ONNX or PyTorch in; a per-target TVM binary out, verified against the float reference.
The public Python API lives here; see README.md for the CLI.
"""

from __future__ import annotations

import os
import signal
import sys

# onnxruntime writes a device id and a telemetry database under ~/.cache/Microsoft when it is
# imported unless this is set first; detc writes nothing outside the outputs it is asked for.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def _exit_while_starting(signum: int, frame: object) -> None:
    os.write(2, b"detc: interrupted\n")
    os._exit(130)


if (
    os.path.basename(sys.argv[0]) == "detc" or sys.orig_argv[1:3] == ["-m", "detc.compiler.cli"]
) and (signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    # Started as the `detc` command: until the command runs (importing onnx, onnx-ir and the
    # passes takes a second) Ctrl-C exits at once with 130, as it does later, instead of
    # interrupting an import midway (a traceback, or numpy's ImportError); nothing is written
    # yet. The command restores Python's handler when it starts.
    signal.signal(signal.SIGINT, _exit_while_starting)

from detc.compiler import *  # noqa: E402, F403  (the public API is defined in detc.compiler)
from detc.compiler import __all__ as _compiler_all  # noqa: E402

__version__ = "0.1.0"
__all__ = ["__version__", *_compiler_all]
