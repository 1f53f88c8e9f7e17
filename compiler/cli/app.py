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
import sys
from collections.abc import Sequence

import click

from detc.compiler.cli.build import compile_cmd, import_cmd, opt_cmd, tune_cmd
from detc.compiler.cli.check import bench_cmd, verify_cmd
from detc.compiler.cli.demo import data_group, demo_group
from detc.compiler.cli.info import doctor_cmd, explain_cmd, passes_cmd, targets_cmd
from detc.compiler.cli.options import echo_err
from detc.compiler.cli.quant import quant_report
from detc.compiler.cli.sweep import sweep_cmd
from detc.compiler.cli.terminal import make_terminal_safe
from detc.compiler.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, DetcError, escape_control

EXIT_INTERNAL = 4

EPILOG = (
    "Exit codes: 0 ok, 1 check failed, 2 bad input/usage/unsupported model, "
    "3 verification mismatch, 4 internal error, 130 interrupted."
)


class _Group(click.Group):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_paragraph()
        formatter.write_text(EPILOG)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="detc", prog_name="detc")
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


def _register(group: click.Group) -> None:
    """Add every verb to ``group`` (``--help`` lists them alphabetically)."""
    verbs = [import_cmd, opt_cmd, compile_cmd, tune_cmd, verify_cmd, bench_cmd]
    verbs += [passes_cmd, explain_cmd, targets_cmd, doctor_cmd]
    verbs += [quant_report, sweep_cmd, data_group, demo_group]
    for verb in verbs:
        group.add_command(verb)


_register(cli)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: map detc's errors to one line on stderr and a documented exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    sys.stdout = make_terminal_safe(sys.stdout)
    sys.stderr = make_terminal_safe(sys.stderr)
    try:
        cli.main(args=argv, prog_name="detc", standalone_mode=False)
    except click.exceptions.Abort:
        echo_err("detc: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        first = escape_control(first)
        echo_err(
            f"detc: internal error: {type(exc).__name__}: {first} "
            "(a bug in detc: rerun with --debug and report the traceback)"
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


if __name__ == "__main__":
    main()
