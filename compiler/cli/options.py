"""Options several verbs share, declared once, and the helpers that turn them into arguments of
detc's Python functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from detc.compiler.cli.config import build_config_callback, verify_config_callback
from detc.compiler.errors import BadInputError
from detc.compiler.fileio import write_file_atomically

F = TypeVar("F", bound=Callable[..., Any])


def echo_err(message: str) -> None:
    """Progress and notes for the user: stderr, so that stdout holds only results."""
    click.echo(message, err=True)


input_shape_option = click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:DxD..",
    help="Make a dynamic input static, e.g. images:1x3x640x640 (repeatable).",
)
pipeline_option = click.option(
    "-p",
    "--pipeline",
    default=None,
    metavar="PIPELINE",
    help="Passes to run, e.g. 'fold-constants,fold-conv-bn,eliminate-dead-code' "
    "(default: the exact passes; `detc passes` lists them; 'default' expands in place).",
)
calib_option = click.option(
    "--calib",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Calibration images (a folder, or a COCO dataset folder) for every pass of the "
    "pipeline that reads them and sets no calib=DIR itself: prune, lowrank, quantize.",
)
config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    is_eager=True,  # its values are the defaults every other option then reads
    callback=build_config_callback,
    metavar="TOML",
    help="A build stated in a TOML file: any option of opt/compile/tune by its long name, "
    'model, pipeline = "..." or [[passes]] tables; [verify] holds verify\'s. Paths are '
    "relative to the file; flags given here win; an unknown key is an error.",
)
verify_config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    is_eager=True,
    expose_value=False,
    callback=verify_config_callback,
    metavar="TOML",
    help="The build's TOML file: its [verify] table states this command's options (gates "
    "such as max_map_drop, data); flags given here win.",
)
dump_option = click.option(
    "--dump-ir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the model after each pass that changed it into this folder.",
)
verify_each_option = click.option(
    "--verify-each",
    is_flag=True,
    help="Run onnxruntime before/after every pass; name the first exact pass that drifts.",
)
target_option = click.option(
    "-t", "--target", default="x86", show_default=True, help="`detc targets` lists them."
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for detc and onnxruntime alike (default: the usable cores).",
)
quiet_option = click.option("--quiet", is_flag=True, help="Print only the summary line.")
decoder_option = click.option(
    "--decoder", default=None, help="yolov5 | yolov8 | yolox | demo | module:function"
)
max_images_option = click.option("--max-images", type=click.IntRange(min=1), default=None)


def json_option(help_text: str) -> Callable[[F], F]:
    """``--json`` (the parameter ``as_json``): what it prints differs by verb."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def device_options(func: F) -> F:
    """--device rpc://HOST:PORT, or --rpc-tracker HOST:PORT --rpc-key KEY: run on a board."""
    func = click.option(
        "--rpc-key", default=None, metavar="KEY", help="Device key at the tracker."
    )(func)
    func = click.option(
        "--rpc-tracker", default=None, metavar="HOST:PORT", help="TVM RPC tracker of a board farm."
    )(func)
    return click.option(
        "--device",
        default=None,
        metavar="rpc://HOST:PORT",
        help="Run on a board's TVM RPC server (rpc://KEY@HOST:PORT goes through a tracker).",
    )(func)


def device_url(device: str | None, rpc_tracker: str | None, rpc_key: str | None) -> str | None:
    """The one device URL that :func:`device_options` state, or None to run here."""
    if rpc_tracker is None and rpc_key is None:
        return device
    if device is not None or rpc_tracker is None or rpc_key is None:
        raise BadInputError("give either --device URL, or both --rpc-tracker and --rpc-key")
    from detc.targets import tracker_device

    return str(tracker_device(rpc_tracker, rpc_key))


def tuning_options(func: F) -> F:
    """--tune's budgets, the tuning database, RPC measurement (compile and tune)."""
    options = [
        click.option(
            "--tuning-db",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Tuning database directory (default: $DETC_CACHE_DIR/tuning). Using one "
            "without --tune applies its schedules without searching.",
        ),
        click.option(
            "--tune-minutes",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Wall-clock budget of the search; it stops cleanly and keeps what it found.",
        ),
        click.option(
            "--trials-per-task",
            type=click.IntRange(min=1),
            default=None,
            help="Most candidates measured per kernel (default 64; 512 with --tune-minutes).",
        ),
        click.option(
            "--trials",
            type=click.IntRange(min=1),
            default=None,
            help="Most candidates measured in all (default: trials per task x kernels).",
        ),
        click.option(
            "--rpc-key",
            "tune_rpc_key",
            default=None,
            metavar="KEY",
            help="Measure on every server registered under KEY at --rpc-tracker.",
        ),
        click.option(
            "--rpc-tracker",
            "tune_rpc_tracker",
            default=None,
            metavar="HOST:PORT",
            help="TVM RPC tracker whose servers measure the candidates.",
        ),
    ]
    for option in options:
        func = option(func)
    return func


def tuning_from_flags(
    tune: bool,
    trials: int | None,
    trials_per_task: int | None,
    tune_minutes: float | None,
    tuning_db: Path | None,
    rpc_tracker: str | None,
    rpc_key: str | None,
    quiet: bool = False,
) -> Any:
    """TuningOptions for the flags of :func:`tuning_options`, or None for an untuned build."""
    searching = tune or any(v is not None for v in (trials, trials_per_task, tune_minutes))
    if not searching and tuning_db is None:
        if rpc_tracker is not None or rpc_key is not None:
            raise BadInputError("--rpc-tracker/--rpc-key measure tuning candidates: add --tune")
        return None
    from detc.targets.tuning.search import TuningOptions

    return TuningOptions(
        tune=searching,
        trials=trials,
        trials_per_task=trials_per_task,
        minutes=tune_minutes,
        database=tuning_db,
        rpc_tracker=rpc_tracker,
        rpc_key=rpc_key,
        progress=not quiet,
    )


def load_pipeline(
    pipeline: str | None, config: Path | None, calib: Path | None = None
) -> str | None:
    """``-p`` text, or the pipeline a ``--config`` TOML states; both at once is refused.
    ``calib`` becomes the calibration images of every pass that declares it reads them
    (``calibration_option``) and sets none itself."""
    from detc.compiler.ir.pipeline import (
        DEFAULT_PIPELINE,
        load_config,
        parse_pipeline,
        pipeline_from_config,
        with_calibration_images,
    )

    chosen = pipeline
    if config is not None:
        from_config = pipeline_from_config(load_config(config), str(config))
        if pipeline is not None and from_config is not None:
            raise BadInputError(f"give the pipeline either with -p or in {config}, not both")
        chosen = pipeline if from_config is None else str(from_config)
    if calib is None:
        return chosen
    steps, given = with_calibration_images(parse_pipeline(chosen or DEFAULT_PIPELINE), str(calib))
    if not given:
        raise BadInputError(
            f"--calib {calib}: no pass of the pipeline without a calib of its own reads "
            "calibration images (prune, lowrank and quantize do)"
        )
    return str(steps)


def save_model(model: Any, path: Path) -> None:
    """Write an ``onnx_ir`` model to ``path`` atomically: a failed save leaves nothing there."""
    import onnx_ir as ir

    write_file_atomically(path, lambda tmp: ir.save(model, tmp))


def pass_printer(quiet: bool) -> Callable[[Any], None]:
    """The ``on_pass`` callback of compile: one line per pass on stderr (none when quiet)."""

    def show(record: Any) -> None:
        if quiet:
            return
        mark = "changed" if record.modified else "no change"
        echo_err(f"  {record.step:<32} {record.seconds * 1000:7.0f} ms  {mark}")

    return show
