"""``detc import``, ``opt``, ``compile`` and ``tune``: a model in, an optimised model, an artifact
or tuning records out."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click

from detc.compiler.cli.options import (
    calib_option,
    config_option,
    dump_option,
    echo_err,
    input_shape_option,
    json_option,
    load_pipeline,
    pass_printer,
    pipeline_option,
    quiet_option,
    save_model,
    target_option,
    threads_option,
    tuning_from_flags,
    tuning_options,
    verify_each_option,
)
from detc.compiler.errors import BadInputError


def check_output_file(output: Path) -> None:
    """BadInputError unless the model file ``output`` can be written, checked before any work:
    not a folder, no file where a parent folder should be, a name the file system takes (with the
    atomic writer's temporary suffix), a folder this process may write in."""
    target = Path(os.path.abspath(output))
    try:
        if target.is_dir():
            raise BadInputError(f"{output} is a folder; give a file name for -o")
        existing = target.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise BadInputError(f"{output}: {existing} is a file, not a folder; choose another -o")
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        # the atomic writer's temporary file: ".<name>.<8 random>.tmp"
        if len(os.fsencode(target.name)) + 14 > name_max:
            raise BadInputError(f"{output}: the file name is too long; choose a shorter -o")
        descriptor, probe = tempfile.mkstemp(prefix=".detc-probe-", dir=existing)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as err:
        raise BadInputError(
            f"{output}: cannot write there ({err.strerror or err}); choose another -o"
        ) from None


@click.command("import")
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

    check_output_file(output)
    loaded = load_model(model, input_shapes=parse_input_shapes(input_shapes))
    save_model(loaded.model, output)
    click.echo(f"{output}: {graph_stats(loaded.model)}")


@click.command("opt")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@pipeline_option
@config_option
@calib_option
@input_shape_option
@dump_option
@verify_each_option
@json_option("Print the pass instruments as JSON.")
def opt_cmd(
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

    check_output_file(output)
    loaded, run = optimize(
        model,
        load_pipeline(pipeline, config, calib),
        input_shapes=parse_input_shapes(input_shapes),
        dump_ir=dump_ir,
        verify_each=verify_each,
    )
    save_model(loaded.model, output)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in run.records], indent=2))
    else:
        click.echo(run.table())
        click.echo(f"wrote {output}")


@click.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@target_option
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
@quiet_option
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default=None,
    help="Arithmetic of the compiled model where the target offers a choice (cuda: fp16 computes "
    "in float16 with float32 accumulation). Default: as the model is.",
)
@click.option(
    "--depfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a Make/Ninja depfile: OUTPUT/manifest.json depends on the model, its "
    "external data, calibration images, spec and config files.",
)
@click.option(
    "--tune",
    is_flag=True,
    help="Search schedules for the kernels the tuning database lacks (budgets below).",
)
@tuning_options
@click.option(
    "--with-preprocess",
    is_flag=True,
    help="Compile the model spec's preprocessing into the library: it then takes a uint8 "
    "RGB image (h, w, 3) of any size and letterboxes/resizes it (bilinear, as Pillow), orders "
    "the channels and normalises as --spec says (x86, arm).",
)
@click.option(
    "--with-nms",
    is_flag=True,
    help="Compile the spec's decoder (yolov5, yolov8, yolox, yolox-logits, demo) and class-aware "
    "NMS into the library: it then returns boxes (M,4) x1,y1,x2,y2, scores (M), classes (M), "
    "count (1), M = max_detections; boxes in original-image pixels with --with-preprocess, "
    "else model-input pixels (x86, arm).",
)
def compile_cmd(
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
    precision: str | None,
    depfile: Path | None,
    tune: bool,
    trials: int | None,
    trials_per_task: int | None,
    tune_minutes: float | None,
    tuning_db: Path | None,
    tune_rpc_tracker: str | None,
    tune_rpc_key: str | None,
    with_preprocess: bool,
    with_nms: bool,
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

    \b
    On the device: --with-preprocess --with-nms make the library take an
    image and return detections (the spec's thresholds and max_detections;
    `detc verify` checks them against the Python path).
    """
    from detc.compiler.driver import compile_model
    from detc.compiler.frontend import parse_input_shapes

    model_spec = None
    if spec is not None:
        from detc.compiler.detection.spec import load_spec, spec_for_model

        # fields the spec file leaves out come from the model (its input size, class names)
        model_spec = spec_for_model(model, spec) if model.suffix == ".onnx" else load_spec(spec)
    tuning = tuning_from_flags(
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
        echo_err(f"detc: compiling {model} for {target}")
    pipeline_text = load_pipeline(pipeline, config, calib)
    target_options: dict[str, object] = {}
    if tuning is not None:
        target_options["tuning"] = tuning
    if precision is not None:
        target_options["precision"] = precision
    result = compile_model(
        model,
        target=target,
        out_dir=output,
        pipeline=pipeline_text,
        input_shapes=parse_input_shapes(input_shapes),
        dump_ir=dump_ir,
        verify_each=verify_each,
        model_spec=model_spec,
        num_threads=threads,
        on_pass=pass_printer(quiet),
        progress=not quiet,
        target_options=target_options or None,
        with_preprocess=with_preprocess,
        with_nms=with_nms,
    )
    if depfile is not None:
        from detc.compiler.depfile import compile_dependencies, write_depfile

        dependencies = compile_dependencies(model, pipeline=pipeline_text, spec=spec, config=config)
        write_depfile(depfile, output / "manifest.json", dependencies)
    manifest = result.manifest
    tuning = manifest.get("tuning", {})
    state = "tuned" if tuning.get("tuned") else "UNTUNED (expect it to be far slower than tuned)"
    if "tasks" in tuning:  # the tuned pipeline: say how much came from the database
        missing, total = tuning["untuned_tasks"], tuning["tasks"]
        if tuning.get("tuned"):
            state = f"tuned ({total} kernels, {tuning['trials']} trials this run)"
        elif missing == total:
            runs_here = manifest["target"].get("host_cpu", {}).get("runs_here", True)
            how = (
                "--tune searches for faster ones"
                if runs_here
                else "a board tunes them: --tune --rpc-tracker HOST:PORT --rpc-key KEY"
            )
            state = (
                f"from detc's templates with default tiles ({total} kernels, none in the tuning "
                f"database; {how})"
            )
        else:
            state = f"partly tuned ({missing} of {total} kernels not in the tuning database)"
    if not quiet:
        click.echo(result.pipeline_run.table())
    click.echo(
        f"wrote {output} — target {manifest['target']['name']}, kernels {state}, "
        f"pipeline {manifest['pipeline'] or '(none)'}"
    )


@click.command("tune")
@click.argument("model", type=click.Path(path_type=Path))
@target_option
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
@quiet_option
def tune_cmd(
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

    options = tuning_from_flags(
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
        load_pipeline(pipeline, config, calib),
        input_shapes=parse_input_shapes(input_shapes),
    )
    if not quiet:
        echo_err(f"detc: tuning {model} for {target}")
    result = tune_model(
        ir.serde.serialize_model(loaded.model),
        target,
        options,
        num_threads=threads,
        report=(lambda _message: None) if quiet else echo_err,
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


@click.command("package")
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@quiet_option
def package_cmd(artifact: Path, output: Path, quiet: bool) -> None:
    """Package ARTIFACT as a bundle folder -o: everything the device needs, nothing else.

    \b
    The model, its parameters as raw buffers, the TVM runtime for the artifact's
    architecture (x86_64, aarch64), bin/detc-run, the C API (include/detc_runtime.h,
    lib/libdetc_runtime.so), a C++ example and a README; SHA256SUMS is checked at open.
    """
    from detc.targets.bundle import package_artifact

    bundle = package_artifact(artifact, output, report=None if quiet else echo_err)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    click.echo(f"wrote {bundle} ({size / 1e6:.1f} MB): copy it to the device; bin/detc-run runs it")
