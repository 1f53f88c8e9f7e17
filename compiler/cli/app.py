"""The ``detc`` command line. Every verb is a thin layer over a Python function of detc.compiler.

Exit codes: 0 ok · 1 check failed (accuracy / latency gate) · 2 bad input, usage or unsupported
model · 3 verification mismatch · 4 internal error (a bug in detc: please report it) · 130
interrupted. Errors are one line on stderr; ``--debug`` (or DETC_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from detc.compiler.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    BadInputError,
    CheckFailedError,
    DetcError,
    VerificationMismatchError,
)

EXIT_INTERNAL = 4

EPILOG = (
    "Exit codes: 0 ok, 1 check failed, 2 bad input/usage/unsupported model, "
    "3 verification mismatch, 4 internal error, 130 interrupted."
)


def _info(message: str) -> None:
    click.echo(message, err=True)


def _write_atomically(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a failure leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_model(model: Any, path: Path) -> None:
    import onnx_ir as ir

    _write_atomically(path, lambda tmp: ir.save(model, tmp))


def _load_pipeline(
    pipeline: str | None, config: Path | None, calib: Path | None = None
) -> str | None:
    """``-p`` text, or the pipeline a ``--config`` TOML states; both at once is refused.
    ``calib`` becomes ``calib=DIR`` of every pass that reads calibration images and has none."""
    from detc.compiler.ir.pipeline import (
        DEFAULT_PIPELINE,
        load_config,
        parse_pipeline,
        pipeline_from_config,
        with_option_default,
    )

    chosen = pipeline
    if config is not None:
        from_config = pipeline_from_config(load_config(config), str(config))
        if pipeline is not None and from_config is not None:
            raise BadInputError(f"give the pipeline either with -p or in {config}, not both")
        chosen = pipeline if from_config is None else str(from_config)
    if calib is None:
        return chosen
    steps, given = with_option_default(
        parse_pipeline(chosen or DEFAULT_PIPELINE), "calib", str(calib)
    )
    if not given:
        raise BadInputError(
            f"--calib {calib}: no pass of the pipeline without a calib of its own reads "
            "calibration images (prune, lowrank and quantize do)"
        )
    return str(steps)


def _pass_printer(quiet: bool):
    def show(record: Any) -> None:
        if quiet:
            return
        mark = "changed" if record.modified else "no change"
        _info(f"  {record.step:<32} {record.seconds * 1000:7.0f} ms  {mark}")

    return show


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
    help='TOML file stating the pipeline (pipeline = "..." or [[passes]] tables).',
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


def device_options(func: Any) -> Any:
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


def _device_url(device: str | None, rpc_tracker: str | None, rpc_key: str | None) -> str | None:
    if rpc_tracker is None and rpc_key is None:
        return device
    if device is not None or rpc_tracker is None or rpc_key is None:
        raise BadInputError("give either --device URL, or both --rpc-tracker and --rpc-key")
    from detc.targets import tracker_device

    return str(tracker_device(rpc_tracker, rpc_key))


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for detc and onnxruntime alike (default: the usable cores).",
)


def tuning_options(func: Any) -> Any:
    """--tune and its budgets, the tuning database, RPC measurement (compile and tune)."""
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


def _tuning_from_flags(
    tune: bool,
    trials: int | None,
    trials_per_task: int | None,
    tune_minutes: float | None,
    tuning_db: Path | None,
    rpc_tracker: str | None,
    rpc_key: str | None,
    quiet: bool = False,
) -> Any:
    """TuningOptions for the flags, or None for a plain (untuned) build."""
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


@cli.command("import")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@input_shape_option
def import_cmd(model: Path, output: Path, input_shapes: Sequence[str]) -> None:
    """Load MODEL (.onnx, or a torch.export .pt2), check and normalise it, save as ONNX.

    ONNX files are checked defensively: size limit, external data only inside the model's folder,
    the ONNX checker, opset conversion into detc's range, and shape inference.
    """
    from detc.compiler.frontend import load_model, parse_input_shapes
    from detc.compiler.ir.stats import graph_stats

    loaded = load_model(model, input_shapes=parse_input_shapes(input_shapes))
    _save_model(loaded.model, output)
    click.echo(f"{output}: {graph_stats(loaded.model)}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@pipeline_option
@config_option
@calib_option
@input_shape_option
@dump_option
@verify_each_option
@click.option("--json", "as_json", is_flag=True, help="Print the pass instruments as JSON.")
def opt(
    model: Path,
    output: Path,
    pipeline: str | None,
    config: Path | None,
    calib: Path | None,
    input_shapes: Sequence[str],
    dump_ir: Path | None,
    verify_each: bool,
    as_json: bool,
) -> None:
    """Run a pass pipeline over MODEL and write the optimised ONNX to -o.

    Prints, per pass, the wall time and nodes / parameters / MACs before and after.
    """
    from detc.compiler.driver import optimize
    from detc.compiler.frontend import parse_input_shapes

    loaded, run = optimize(
        model,
        _load_pipeline(pipeline, config, calib),
        input_shapes=parse_input_shapes(input_shapes),
        dump_ir=dump_ir,
        verify_each=verify_each,
    )
    _save_model(loaded.model, output)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in run.records], indent=2))
    else:
        click.echo(run.table())
        click.echo(f"wrote {output}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", default="x86", show_default=True, help="`detc targets` lists them.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@pipeline_option
@config_option
@calib_option
@input_shape_option
@dump_option
@verify_each_option
@threads_option
@click.option(
    "--spec",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Preprocessing/decoder spec (JSON or TOML) stored in the manifest.",
)
@click.option("--quiet", is_flag=True, help="Print only the summary line.")
@click.option(
    "--tune",
    is_flag=True,
    help="Search schedules for the kernels the tuning database lacks (budgets below).",
)
@tuning_options
def compile(
    model: Path,
    target: str,
    output: Path,
    pipeline: str | None,
    config: Path | None,
    calib: Path | None,
    input_shapes: Sequence[str],
    dump_ir: Path | None,
    verify_each: bool,
    threads: int | None,
    spec: Path | None,
    quiet: bool,
    tune: bool,
    trials: int | None,
    trials_per_task: int | None,
    tune_minutes: float | None,
    tuning_db: Path | None,
    tune_rpc_tracker: str | None,
    tune_rpc_key: str | None,
) -> None:
    """Compile MODEL for a target into the artifact folder -o.

    \b
    The artifact holds the compiled library, the parameters and manifest.json
    (inputs/outputs, target, pipeline, versions, sha256 of MODEL). It is written
    atomically: on failure or Ctrl-C, nothing is left at -o.

    \b
    int8: -p "<default>,quantize{calib=DIR}" calibrates on DIR's images; add
    max_map_drop=1.0 to keep the most sensitive layers in float until the mAP
    drop on a COCO set (calib, or data=DIR) fits. The artifact then also holds
    reference_qdq.onnx and the budget, which `detc verify` holds it to.
    """
    from detc.compiler.driver import compile_model
    from detc.compiler.frontend import parse_input_shapes

    model_spec = None
    if spec is not None:
        from detc.compiler.detection.spec import load_spec

        model_spec = load_spec(spec)
    tuning = _tuning_from_flags(
        tune,
        trials,
        trials_per_task,
        tune_minutes,
        tuning_db,
        tune_rpc_tracker,
        tune_rpc_key,
        quiet,
    )
    if not quiet:
        _info(f"detc: compiling {model} for {target}")
    result = compile_model(
        model,
        target=target,
        out_dir=output,
        pipeline=_load_pipeline(pipeline, config, calib),
        input_shapes=parse_input_shapes(input_shapes),
        dump_ir=dump_ir,
        verify_each=verify_each,
        model_spec=model_spec,
        num_threads=threads,
        on_pass=_pass_printer(quiet),
        progress=not quiet,
        target_options=None if tuning is None else {"tuning": tuning},
    )
    manifest = result.manifest
    tuning = manifest.get("tuning", {})
    state = "tuned" if tuning.get("tuned") else "UNTUNED (expect it to be far slower than tuned)"
    if "tasks" in tuning:  # the tuned pipeline: say how much came from the database
        state = (
            f"tuned ({tuning['tasks']} kernels, {tuning['trials']} trials this run)"
            if tuning.get("tuned")
            else f"partly tuned ({tuning['untuned_tasks']} of {tuning['tasks']} kernels "
            "not in the tuning database)"
        )
    if not quiet:
        click.echo(result.pipeline_run.table())
    click.echo(
        f"wrote {output} — target {manifest['target']['name']}, kernels {state}, "
        f"pipeline {manifest['pipeline'] or '(none)'}"
    )


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", default="x86", show_default=True, help="`detc targets` lists them.")
@pipeline_option
@config_option
@calib_option
@input_shape_option
@threads_option
@tuning_options
@click.option(
    "--import-db",
    type=click.Path(path_type=Path),
    default=None,
    help="Merge an exported database file (or another database directory) in first.",
)
@click.option(
    "--export-db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Afterwards, write this model's best records to one portable JSON file "
    "(gzip-compressed if the name ends in .gz).",
)
@click.option("--quiet", is_flag=True, help="Print only the summary line.")
def tune(
    model: Path,
    target: str,
    pipeline: str | None,
    config: Path | None,
    calib: Path | None,
    input_shapes: Sequence[str],
    threads: int | None,
    trials: int | None,
    trials_per_task: int | None,
    tune_minutes: float | None,
    tuning_db: Path | None,
    tune_rpc_tracker: str | None,
    tune_rpc_key: str | None,
    import_db: Path | None,
    export_db: Path | None,
    quiet: bool,
) -> None:
    """Tune MODEL's kernels for a target into the tuning database (no artifact).

    \b
    Kernels already in the database are not searched again: a later
    `detc compile MODEL --tune` then runs zero trials. The database is keyed by
    kernel and target and shared by every model; Ctrl-C keeps what was measured.
    """
    import onnx_ir as ir

    from detc.compiler.driver import optimize
    from detc.compiler.frontend import parse_input_shapes
    from detc.targets.tuning.search import tune_model

    options = _tuning_from_flags(
        True,
        trials,
        trials_per_task,
        tune_minutes,
        tuning_db,
        tune_rpc_tracker,
        tune_rpc_key,
        quiet,
    )
    loaded, _ = optimize(
        model,
        _load_pipeline(pipeline, config, calib),
        input_shapes=parse_input_shapes(input_shapes),
    )
    if not quiet:
        _info(f"detc: tuning {model} for {target}")
    result = tune_model(
        ir.serde.serialize_model(loaded.model),
        target,
        options,
        num_threads=threads,
        report=(lambda _message: None) if quiet else _info,
        import_from=import_db,
    )
    tuning = result.tuning
    if export_db is not None:
        count = result.database.export_to(export_db, result.workloads)
        click.echo(f"exported {count} record(s) to {export_db}")
    click.echo(
        f"tuned {model} for {target}: {tuning['tasks'] - tuning['untuned_tasks']} of "
        f"{tuning['tasks']} kernels in {result.database.directory}, "
        f"{tuning['trials']} trials this run ({tuning['stopped_by']})"
    )


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="The float reference ONNX (default: the model the artifact was compiled from). An int8 "
    "artifact is compared with the quantized model saved in it, and with this for accuracy.",
)
@click.option("--inputs", type=click.Path(dir_okay=False), default=None, help=".npz of inputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random inputs.")
@click.option("--runs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--emulate", is_flag=True, help="Run a cross-compiled artifact under qemu.")
@device_options
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="COCO-format dataset (images/ + instances.json): verify in mAP and boxes too.",
)
@click.option("--decoder", default=None, help="yolov5 | yolov8 | yolox | demo | module:function")
@click.option("--max-images", type=click.IntRange(min=1), default=None)
@click.option(
    "--max-map-drop",
    type=float,
    default=None,
    help="Fail (exit 3) if mAP@[.5:.95] drops by more than this many points (int8 artifacts: "
    "against the float model; default: the compile's max_map_drop, else 1.0).",
)
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where report.json / report.md go (default: ARTIFACT/report).",
)
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the tensor report as JSON.")
def verify(
    artifact: Path,
    reference: Path | None,
    inputs: str | None,
    seed: int,
    runs: int,
    emulate: bool,
    device: str | None,
    rpc_tracker: str | None,
    rpc_key: str | None,
    data: Path | None,
    decoder: str | None,
    max_images: int | None,
    max_map_drop: float | None,
    report_dir: Path | None,
    threads: int | None,
    as_json: bool,
) -> None:
    """Check ARTIFACT against its float reference in onnxruntime (exit 3 beyond tolerance).

    Tensors are compared output by output (max abs / rel error, cosine). With --data, both run on
    every image and the report adds mAP, box agreement and score drift.

    \b
    int8 artifacts (compiled with quantize{calib=...}) are held to the quantized
    model saved in them (reference_qdq.onnx, run by onnxruntime): per output, the
    artifact's channel-mean SQNR against it may be at most 3 dB below that of the
    reference with its scales moved by 1e-5 (how far rounding alone takes an int8
    model), and at most 1 dB further from the float model than the reference is.
    With --data, the mAP drop against the
    float model must stay within --max-map-drop; the report names the layers kept
    in float.
    """
    from detc.compiler.verify.tensors import quantization_record, read_manifest, verify_tensors

    manifest = read_manifest(artifact)
    device = _device_url(device, rpc_tracker, rpc_key)
    if emulate and device is not None:
        raise BadInputError("--emulate and --device exclude each other: pick one place to run")
    record = quantization_record(manifest)
    if record is not None:
        _verify_int8(
            artifact,
            reference,
            manifest,
            record,
            inputs=inputs,
            seed=seed,
            runs=runs,
            emulate=emulate,
            device=device,
            data=data,
            decoder=decoder,
            max_images=max_images,
            max_map_drop=max_map_drop,
            report_dir=report_dir,
            threads=threads,
            as_json=as_json,
        )
        return
    ref = reference or _default_reference(manifest, artifact)
    report = verify_tensors(
        artifact,
        ref,
        inputs=inputs,
        seed=seed,
        runs=runs,
        num_threads=threads,
        emulate=emulate,
        device=device,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"reference {ref}, inputs: {report.inputs}")
        click.echo(report.table())
        for note in report.notes:
            click.echo(note)
    failures: list[str] = []
    if not report.ok:
        bad = [d.name for d in report.diffs if not d.within_tolerance]
        failures.append(f"output(s) {', '.join(bad)} beyond tolerance")
    if data is not None:
        failures += _verify_detection(
            artifact,
            ref,
            manifest,
            data,
            decoder,
            max_images,
            max_map_drop,
            report_dir,
            emulate=emulate,
            device=device,
            threads=threads,
            as_json=as_json,
        )
    if failures:
        raise VerificationMismatchError(f"{artifact}: " + "; ".join(failures))
    click.echo("verify: ok", err=as_json)  # with --json, stdout holds only the JSON


def _verify_int8(
    artifact: Path,
    reference: Path | None,
    manifest: dict[str, Any],
    record: dict[str, Any],
    *,
    inputs: str | None,
    seed: int,
    runs: int,
    emulate: bool,
    device: str | None,
    data: Path | None,
    decoder: str | None,
    max_images: int | None,
    max_map_drop: float | None,
    report_dir: Path | None,
    threads: int | None,
    as_json: bool,
) -> None:
    """``detc verify`` of an int8 artifact: against its quantized reference, and the float model."""
    from detc.compiler.verify.tensors import quantization_lines, verify_quantized_tensors

    float_reference = reference or _source_model(manifest, artifact)
    if data is not None and float_reference is None:
        _default_reference(manifest, artifact)  # raises: the mAP budget needs the float model
    report = verify_quantized_tensors(
        artifact,
        float_reference,
        inputs=inputs,
        seed=seed,
        runs=runs,
        num_threads=threads,
        emulate=emulate,
        device=device,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("\n".join(quantization_lines(record)))
        click.echo(
            f"quantized reference {report.quantized_reference}, float reference "
            f"{float_reference or '(none)'}, inputs: {report.inputs}"
        )
        click.echo(report.table())
        for note in report.notes:
            click.echo(note)
    failures: list[str] = []
    if not report.ok:
        bad = [o.name for o in report.outputs if not o.ok]
        failures.append(f"output(s) {', '.join(bad)} disagree with the quantized reference")
    if data is not None:
        from detc.compiler.verify.detection import verify_quantized_detection

        assert float_reference is not None
        detection = verify_quantized_detection(
            artifact,
            float_reference,
            manifest,
            data,
            max_map_drop=max_map_drop,
            decoder=decoder,
            max_images=max_images,
            emulate=emulate,
            device=device,
            num_threads=threads,
        )
        out = report_dir or (artifact / "report")
        detection.write(out)
        click.echo(detection.render_table(), err=as_json)
        click.echo(f"report: {out / 'report.md'} (and report.json, quantization.json)", err=as_json)
        failures += detection.failures()
    if failures:
        raise VerificationMismatchError(f"{artifact}: " + "; ".join(failures))
    click.echo("verify: ok", err=as_json)  # with --json, stdout holds only the JSON


def _source_model(manifest: dict[str, Any], artifact: Path) -> Path | None:
    """The float model the artifact was compiled from, as ONNX: the copy the artifact keeps
    when the source was a torch module or ``.pt2``, else the source file if it is still where
    the compile read it."""
    source = manifest.get("source") or {}
    kept = artifact / source["onnx"] if source.get("onnx") else None
    if kept is not None and kept.is_file():
        return kept
    path = source.get("path")
    return Path(path) if path and Path(path).is_file() else None


def _default_reference(manifest: dict[str, Any], artifact: Path) -> Path:
    found = _source_model(manifest, artifact)
    if found is not None:
        return found
    source = (manifest.get("source") or {}).get("path")
    raise BadInputError(
        f"{artifact}: give --reference MODEL.onnx (the source model is not at {source})"
    )


def _verify_detection(
    artifact: Path,
    reference: Path,
    manifest: dict[str, Any],
    data: Path,
    decoder: str | None,
    max_images: int | None,
    max_map_drop: float | None,
    report_dir: Path | None,
    *,
    emulate: bool,
    device: str | None,
    threads: int | None,
    as_json: bool,
) -> list[str]:
    from detc.compiler.verify.detection import verify_detection

    report = verify_detection(
        artifact,
        reference,
        manifest,
        data,
        decoder=decoder,
        max_images=max_images,
        emulate=emulate,
        device=device,
        num_threads=threads,
    )
    out = report_dir or (artifact / "report")
    report.write(out)
    click.echo(report.render_table(), err=as_json)
    click.echo(f"report: {out / 'report.md'} (and report.json)", err=as_json)
    if max_map_drop is not None and report.map_drop is not None and report.map_drop > max_map_drop:
        return [
            f"mAP@[.5:.95] dropped {report.map_drop:.2f} points (> --max-map-drop {max_map_drop})"
        ]
    return []


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--vs",
    "versus",
    default="onnxruntime",
    show_default=True,
    help="'onnxruntime' (runs --reference) or another artifact folder.",
)
@click.option("--reference", type=click.Path(path_type=Path), default=None)
@device_options
@threads_option
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--max-ratio",
    type=float,
    default=None,
    help="Fail (exit 1) if median(artifact)/median(other) exceeds this.",
)
def bench(
    artifact: Path,
    versus: str,
    reference: Path | None,
    device: str | None,
    rpc_tracker: str | None,
    rpc_key: str | None,
    threads: int | None,
    warmup: int,
    runs: int,
    as_json: bool,
    max_ratio: float | None,
) -> None:
    """Latency of ARTIFACT against onnxruntime (or another artifact), interleaved A/B.

    Same input, same thread count, warm-up first, then runs alternate ABBA. Prints median and p90
    of each and `ratio A/B` (below 1.0: the artifact is faster).
    """
    from detc.compiler.bench import bench_interleaved
    from detc.compiler.driver import default_threads, load
    from detc.compiler.verify.tensors import manifest_inputs, read_manifest, reference_proto

    manifest = read_manifest(artifact)
    n = threads or default_threads()
    from detc.compiler.reference import ort_session, random_feeds, run_session

    feeds = random_feeds(manifest_inputs(manifest))
    device = _device_url(device, rpc_tracker, rpc_key)
    if device is not None:
        _bench_on_device(artifact, versus, device, feeds, threads, runs, as_json, max_ratio)
        return
    a = load(artifact, num_threads=n)
    if versus == "onnxruntime":
        ref = reference or _default_reference(manifest, artifact)
        session = ort_session(reference_proto(ref, manifest), threads=n)
        b_name = f"onnxruntime ({Path(ref).name})"

        def run_b(f: Any) -> Any:
            return run_session(session, f)
    else:
        other = Path(versus)
        if not (other / "manifest.json").is_file():
            raise BadInputError(f"--vs {versus}: neither 'onnxruntime' nor a detc artifact folder")
        b = load(other, num_threads=n)
        b_name = f"detc ({other})"
        run_b = b.run
    result = bench_interleaved(
        a.run,
        run_b,
        feeds,
        a_name=f"detc ({artifact})",
        b_name=b_name,
        threads=n,
        warmup=warmup,
        runs=runs,
        progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(result.table())
    if max_ratio is not None and result.ratio > max_ratio:
        raise CheckFailedError(f"ratio {result.ratio:.3f} exceeds --max-ratio {max_ratio}")


def _bench_on_device(
    artifact: Path,
    versus: str,
    device: str,
    feeds: dict[str, Any],
    threads: int | None,
    runs: int,
    as_json: bool,
    max_ratio: float | None,
) -> None:
    """Latency timed on the board itself (network excluded); A/B alternates between artifacts."""
    import numpy as np

    from detc.targets import rpc_time

    others = [] if versus == "onnxruntime" else [Path(versus)]
    if versus == "onnxruntime":
        _info(
            "detc: onnxruntime does not run on the board; timing the artifact alone (--vs DIR2 "
            "compares two artifacts on the board)"
        )
    samples: dict[Path, list[float]] = {artifact: [], **{o: [] for o in others}}
    order = [artifact, *others]
    for round_index in range(max(1, runs // 5)):
        for art in order if round_index % 2 == 0 else order[::-1]:
            samples[art] += rpc_time(art, device, feeds, number=5, repeat=5, num_threads=threads)
    summary: dict[str, Any] = {"device": device, "threads": threads, "interleaved": bool(others)}
    for label, art in zip(("a", "b"), order, strict=False):
        ms = samples[art]
        summary[label] = {
            "name": f"detc ({art})",
            "median_ms": round(float(np.median(ms)), 4),
            "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "runs": len(ms),
        }
    if others:
        summary["ratio"] = round(summary["a"]["median_ms"] / summary["b"]["median_ms"], 4)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for label in ("a", "b"):
            if label in summary:
                row = summary[label]
                click.echo(
                    f"{row['name']:<40} {row['median_ms']:>9.2f}ms {row['p90_ms']:>9.2f}ms"
                    f"  on {device}"
                )
        if others:
            click.echo(f"ratio {summary['ratio']:.3f}")
    if max_ratio is not None and "ratio" in summary and summary["ratio"] > max_ratio:
        raise CheckFailedError(f"ratio {summary['ratio']:.3f} exceeds --max-ratio {max_ratio}")


@cli.command()
@click.option("-v", "--verbose", is_flag=True, help="Show each pass's options.")
def passes(verbose: bool) -> None:
    """List every pass: name, exact or approximate, what it does (plugins included)."""
    from detc.compiler.ir.pass_base import describe_options
    from detc.compiler.ir.registry import all_passes

    for name, cls in all_passes().items():
        kind = "exact" if cls.exact else "approx"
        origin = "" if cls.__module__.startswith("detc.") else f"  [{cls.__module__}]"
        click.echo(f"{name:<24} {kind:<7} {cls.summary()}{origin}")
        if verbose:
            for opt_name, kind_name, default, help_text in describe_options(cls):
                click.echo(f"{'':<32}{opt_name}: {kind_name} = {default}")
                for line in textwrap.wrap(help_text, width=68):
                    click.echo(f"{'':<36}{line}")


@cli.command()
@click.argument("pass_name", metavar="PASS")
@click.argument("model", type=click.Path(path_type=Path))
@input_shape_option
def explain(pass_name: str, model: Path, input_shapes: Sequence[str]) -> None:
    """For every candidate node of MODEL, whether PASS fires there and, if not, why."""
    from detc.compiler.frontend import load_model, parse_input_shapes
    from detc.compiler.ir.pipeline import parse_pipeline

    steps = parse_pipeline(pass_name).steps
    if len(steps) != 1:
        raise BadInputError(f"explain takes one pass, got {len(steps)}: {pass_name!r}")
    pass_ = steps[0].instantiate()
    loaded = load_model(model, input_shapes=parse_input_shapes(input_shapes))
    candidates = pass_.explain(loaded.model)
    if not candidates:
        click.echo(
            f"{steps[0].name}: no per-node candidates to explain in {model} "
            "(no anchor nodes, or the pass works on the whole graph)"
        )
        return
    for cand in candidates:
        click.echo(str(cand))
    fires = sum(c.fires for c in candidates)
    click.echo(f"{fires} of {len(candidates)} candidates fire")


@cli.command()
def targets() -> None:
    """List compilation targets and what each enables."""
    from detc.targets import available_targets

    for info in available_targets():
        click.echo(f"{info.name:<22} {info.description}")


@cli.command()
def doctor() -> None:
    """Report every tool detc can use and what is missing for which target."""
    from detc.targets import doctor as run_doctor

    missing = 0
    for rec in run_doctor():
        found = rec.found or "MISSING"
        missing += rec.found is None and not rec.needed_for.startswith("optional")
        click.echo(f"{rec.tool:<32} {found}")
        click.echo(f"{'':<32}   for: {rec.needed_for}")
        if rec.found is None and rec.install_hint:
            click.echo(f"{'':<32}   install: {rec.install_hint}")
    click.echo(
        "every required tool found" if not missing else f"{missing} tool(s) missing (see above)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: map detc's errors to one line on stderr and a documented exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="detc", standalone_mode=False)
    except click.exceptions.Abort:
        _info("detc: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_BAD_INPUT if exc.exit_code == 2 else exc.exit_code)
    except DetcError as exc:
        if debug or os.environ.get("DETC_DEBUG"):
            raise
        _info(f"detc: error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _info("detc: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if debug or os.environ.get("DETC_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _info(
            f"detc: internal error: {type(exc).__name__}: {first} "
            "(a bug in detc: rerun with --debug and report the traceback)"
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


def _register_optional_commands() -> None:
    """Verbs whose modules are written alongside (data, demo); they register themselves."""
    from detc.compiler.cli import extra as _cli_extra

    _cli_extra.register(cli)


_register_optional_commands()

if __name__ == "__main__":
    main()
