"""``detc quant-report``: which layers int8 quantization hurts, as a table (and a plot)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from detc.compiler.cli.options import json_option
from detc.passes.quantize.core import ACTIVATIONS, METHODS, RANK_BY


@click.command("quant-report")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="COCO dataset (images/ + instances.json): also measure each layer's mAP change.",
)
@click.option(
    "--decoder",
    default=None,
    help="yolov5, yolov8, yolox, demo or module:function (default: the model spec's).",
)
@click.option(
    "--calib",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Calibration images: a folder or a COCO dataset (default: --data).",
)
@click.option("--method", type=click.Choice(METHODS), default="percentile", show_default=True)
@click.option("--calib-images", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--probe-images",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Calibration images the output SQNR is measured on.",
)
@click.option(
    "--max-images", type=click.IntRange(min=1), default=None, help="Images of --data per mAP."
)
@click.option(
    "--activations", type=click.Choice(ACTIVATIONS), default="asymmetric", show_default=True
)
@click.option(
    "--rank-by",
    type=click.Choice(RANK_BY),
    default="sqnr",
    show_default=True,
    help="map: by each layer's own mAP change (needs --data; noisy on small datasets).",
)
@click.option(
    "-p",
    "--pipeline",
    default="default",
    show_default=True,
    help="Passes run first, so that layer names match what `quantize{exclude=...}` sees "
    "('none': no passes).",
)
@click.option("--threads", type=click.IntRange(min=0), default=0, help="onnxruntime threads.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None)
@json_option("Print the report as JSON.")
def quant_report(
    model: Path,
    data: Path | None,
    decoder: str | None,
    calib: Path | None,
    method: str,
    calib_images: int,
    probe_images: int,
    max_images: int | None,
    activations: str,
    rank_by: str,
    pipeline: str,
    threads: int,
    plot: Path | None,
    as_json: bool,
) -> None:
    """Rank MODEL's layers by how much quantizing each one alone to int8 hurts.

    Per Conv/Gemm/MatMul: its share of the MACs, the SQNR of the model's outputs with only
    that layer quantized and, with --data, the change of COCO mAP@[.5:.95]. The top of the
    table is what `quantize{max_map_drop=...}` keeps in float first. e.g. `detc quant-report
    m.onnx --data coco/ --decoder yolov5 --plot sensitivity.png`.
    """
    from detc.compiler.errors import BadInputError
    from detc.passes.quantize.mixed_precision import (
        Calibration,
        layer_sensitivity,
        write_sensitivity_plot,
    )

    calib = calib if calib is not None else data
    if calib is None:
        raise BadInputError("quant-report needs calibration images: give --calib DIR or --data")
    if pipeline.strip().lower() == "none":
        from detc.compiler.frontend import load_model

        loaded = load_model(model)
    else:
        from detc.compiler.driver import optimize

        loaded, _ = optimize(model, pipeline)

    def progress(layer: object) -> None:
        click.echo(f"measured {getattr(layer, 'name', layer)}", err=True)

    report = layer_sensitivity(
        loaded.model,
        Calibration(calib, calib_images, method=method, activations=activations),
        data,
        decoder,
        probe_images=probe_images,
        max_images=max_images,
        rank_by=rank_by,
        threads=threads,
        on_layer=None if as_json else progress,
    )
    if plot is not None:
        write_sensitivity_plot(report, plot)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.table())
        if plot is not None:
            click.echo(f"wrote {plot}")
