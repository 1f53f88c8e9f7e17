"""``detc sweep``: what an approximate pass costs and saves, setting by setting."""

from __future__ import annotations

import json
from pathlib import Path

import click

from detc.compiler.cli.options import decoder_option, json_option, max_images_option
from detc.compiler.errors import BadInputError


@click.command("sweep")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--pass", "pass_name", required=True, help="The approximate pass: prune | lowrank.")
@click.option("--values", required=True, help="Comma-separated settings, e.g. 0.1,0.2,0.3,0.4.")
@click.option("--option", default=None, help="Which option --values sets (default: the pass's).")
@click.option("--options", "pass_options", default="", help="Further options, e.g. ridge=0.01.")
@click.option(
    "--then",
    "then",
    default="",
    metavar="PASSES",
    help="Passes run after the swept one, e.g. 'recover{minutes=20}': the mAP after recovery.",
)
@click.option(
    "--calib",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Calibration images of the swept pass and of every --then pass that reads them "
    "(recover's images).",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="COCO-format dataset for mAP (without it: MACs and latency only).",
)
@decoder_option
@max_images_option
@click.option(
    "--target",
    default=None,
    help="Also compile the base model and every setting for this target (detc's default "
    "build) and time them interleaved: detc's own latency beside onnxruntime's.",
)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the trade-off plot (PNG) here.",
)
@json_option("Print the result as JSON.")
def sweep_cmd(
    model: Path,
    pass_name: str,
    values: str,
    option: str | None,
    pass_options: str,
    then: str,
    calib: Path | None,
    data: Path | None,
    decoder: str | None,
    max_images: int | None,
    threads: int,
    target: str | None,
    runs: int,
    plot: Path | None,
    as_json: bool,
) -> None:
    """MAC reduction, latency and mAP of an approximate pass at several settings.

    The curve to choose a setting from: e.g. `detc sweep m.onnx --pass prune --values
    0.1,0.2,0.3 --calib images/ --data coco/ --decoder yolov5 --plot sweep.png`; with
    `--then 'recover{minutes=20}'` the mAP after recovery, with `--target x86` detc's own
    latency (compiled, interleaved) beside onnxruntime's.
    """
    from detc.compiler.ir.pipeline import parse_pipeline, with_calibration_images
    from detc.compiler.sweep import sweep

    settings = [v.strip() for v in values.split(",") if v.strip()]
    if then.strip():
        then = str(parse_pipeline(then))  # a typo fails now, naming the text
    if calib is not None:
        from detc.compiler.ir.registry import get_pass

        key = get_pass(pass_name).calibration_option
        if key is None:
            raise BadInputError(f"--calib {calib}: pass '{pass_name}' reads no calibration images")
        pass_options = ",".join(o for o in (pass_options, f"{key}={calib}") if o)
        if then.strip():
            then = str(with_calibration_images(parse_pipeline(then), str(calib))[0])
    result = sweep(
        model,
        pass_name,
        settings,
        data=data,
        decoder=decoder,
        option=option,
        pass_options=pass_options,
        then=then.strip(),
        target=target,
        threads=threads,
        runs=runs,
        max_images=max_images,
        plot=plot,
    )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
