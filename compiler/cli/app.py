"""The ``detc`` command line. Every verb is a thin layer over a Python function of detc.compiler.

Exit codes: 0 ok · 1 check failed (accuracy / latency gate) · 2 bad input, usage or unsupported
model · 3 verification mismatch · 4 internal error (a bug in detc: please report it) · 130
interrupted. Errors are one line on stderr; ``--debug`` (or DETC_DEBUG=1) adds the traceback.

The verbs live one module per group: build (import, opt, compile, tune), check (verify, bench),
info (passes, explain, targets, doctor), quant (quant-report), sweep, demo (data, demo); the
options they share are declared once in :mod:`detc.compiler.cli.options`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence

import click

from detc.compiler.cli.build import compile_cmd, import_cmd, opt_cmd, package_cmd, tune_cmd
from detc.compiler.cli.check import bench_cmd, verify_cmd
from detc.compiler.cli.demo import data_group, demo_group
from detc.compiler.cli.info import doctor_cmd, explain_cmd, passes_cmd, targets_cmd
from detc.compiler.cli.options import echo_err
from detc.compiler.cli.quant import quant_report
from detc.compiler.cli.sweep import sweep_cmd
from detc.compiler.cli.terminal import make_terminal_safe
from detc.compiler.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, DetcError, escape_control

EXIT_INTERNAL = 4

#: the libraries detc runs, by top-level module: named when an error comes from inside one
_COMPONENTS = {
    "tvm": "TVM",
    "tvm_ffi": "TVM",
    "onnxruntime": "onnxruntime",
    "onnx": "onnx",
    "onnx_ir": "onnx-ir",
    "onnxscript": "onnxscript",
    "torch": "PyTorch",
    "google": "protobuf",
    "numpy": "numpy",
    "PIL": "Pillow",
}

EPILOG = (
    "Exit codes: 0 ok, 1 check failed, 2 bad input/usage/unsupported model, "
    "3 verification mismatch, 4 internal error, 130 interrupted."
)


class _Group(click.Group):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_paragraph()
        formatter.write_text(EPILOG)


def _print_cmake_dir(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from detc.targets.bundle import cmake_dir

    click.echo(str(cmake_dir()))
    ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="detc", prog_name="detc")
@click.option(
    "--cmake-dir",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_cmake_dir,
    help="Print the folder of detc's CMake package (detc_add_model) and exit.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """detc — compile object detectors for x86, ARM and CUDA, and prove the result.

    \b
    Typical use:
      detc compile model.onnx --target x86 -o build/model
      detc verify build/model --reference model.onnx
      detc bench build/model --vs onnxruntime
    """
    ctx.ensure_object(dict)
    if debug:
        os.environ["DETC_DEBUG"] = "1"
    # Library modules report progress through `logging` ("detc.*"); the CLI shows it on stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    detc_logger = logging.getLogger("detc")
    detc_logger.handlers[:] = [handler]
    detc_logger.setLevel(logging.DEBUG if debug else logging.INFO)
    detc_logger.propagate = False
    # The libraries' own log records (onnx-ir logs a traceback when its shape inference fails on
    # a model) and Python warnings: their errors as one line each, the rest only with --debug.
    # detc's own messages say what the user must know; a refused model gets one line.
    if not debug:
        root = logging.getLogger()
        others = [h for h in root.handlers if not isinstance(h, _LibraryErrors)]
        handler = _LibraryErrors(sys.stderr)
        handler.setLevel(logging.ERROR)
        root.handlers[:] = [*others, handler]
        logging.captureWarnings(True)


class _LibraryErrors(logging.StreamHandler):
    """Log records of the libraries detc runs as ``detc: error (<library>): <first line>``:
    one line each, without traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().strip()
        top = record.name.split(".")[0]
        if record.name == "py.warnings":  # "<file>:<line>: <Category>: <text>"
            found = re.search(r"(?:site|dist)-packages/(\w+)/", message)
            top = found.group(1) if found else "python"
            message = message.split(": ", 1)[-1]
        lines = message.splitlines() or [""]
        level = record.levelname.lower()
        return escape_control(f"detc: {level} ({_COMPONENTS.get(top, top)}): {lines[0][:300]}")


def _register(group: click.Group) -> None:
    """Add every verb to ``group`` (``--help`` lists them alphabetically)."""
    verbs = [import_cmd, opt_cmd, compile_cmd, tune_cmd, package_cmd, verify_cmd, bench_cmd]
    verbs += [passes_cmd, explain_cmd, targets_cmd, doctor_cmd]
    verbs += [quant_report, sweep_cmd, data_group, demo_group]
    for verb in verbs:
        group.add_command(verb)


_register(cli)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: map detc's errors to one line on stderr and a documented exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if getattr(signal.getsignal(signal.SIGINT), "__module__", None) == "detc":
        # detc/__init__'s handler while the command started (exit 130 at once): from now on
        # Ctrl-C raises KeyboardInterrupt, so that a build removes what it staged
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout = make_terminal_safe(sys.stdout)
    sys.stderr = make_terminal_safe(sys.stderr)
    try:
        cli.main(args=argv, prog_name="detc", standalone_mode=False)
    except click.exceptions.Abort:
        echo_err("detc: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        # one line, as every other error (click's own form spends three on usage)
        message = escape_control(exc.format_message())
        if isinstance(exc, click.UsageError):
            command = exc.ctx.command_path if exc.ctx is not None else "detc"
            message += f" (see {command} --help)"
        echo_err(f"detc: error: {message}")
        sys.exit(EXIT_BAD_INPUT if exc.exit_code == 2 else exc.exit_code)
    except DetcError as exc:
        if debug or os.environ.get("DETC_DEBUG"):
            raise
        # one line, whatever the message quotes from a model file
        echo_err(f"detc: error: {escape_control(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        echo_err("detc: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if debug or os.environ.get("DETC_DEBUG"):
            raise
        component = failing_component(exc)
        where = "" if component == "detc" else f" in {component}"
        echo_err(
            f"detc: internal error{where}: {type(exc).__name__}: {escape_control(_summary(exc))} "
            "(a bug in detc: rerun with --debug and report the traceback)"
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


def failing_component(exc: BaseException) -> str:
    """The library an unexpected exception came from ("TVM", "onnxruntime", ...), else "detc":
    the module of its class, else of the innermost frame that is not detc's or Python's."""
    modules = [type(exc).__module__]
    modules += [
        frame.f_globals.get("__name__", "")
        for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__)))
    ]
    for module in modules:
        component = _COMPONENTS.get(module.split(".")[0])
        if component is not None:
            return component
    return "detc"


def _summary(exc: BaseException) -> str:
    """One line of ``exc``'s message: the first, or after a traceback banner (TVM puts its C++
    stack first) the last line that is not a frame."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        lines = [line for line in lines if not line.startswith(("File ", "Traceback", "^"))][-1:]
    return lines[0][:300] if lines else ""


if __name__ == "__main__":
    main()
