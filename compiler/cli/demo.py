"""``detc data synth`` and ``detc demo``: synthetic detection data, and the whole job on the
detector detc ships."""

from __future__ import annotations

from pathlib import Path

import click

from detc.compiler.errors import CheckFailedError, VerificationMismatchError


@click.group("data")
def data_group() -> None:
    """Detection datasets: make synthetic ones."""


@data_group.command("synth")
@click.option("--n", "n_images", type=click.IntRange(min=1), required=True, help="Images to make.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=256, show_default=True)
def data_synth(n_images: int, output: Path, seed: int, image_size: int) -> None:
    """Write N synthetic shape images + COCO instances.json to -o (same seed, same bytes)."""
    from detc.compiler.demo.synth import generate_dataset

    generate_dataset(output, n_images, seed, image_size)
    click.echo(f"wrote {n_images} images and {output / 'instances.json'}")


@click.group("demo", invoke_without_command=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("build/demo"),
    show_default=True,
    help="Where the artifact and the report go.",
)
@click.option("--images", type=click.IntRange(min=1), default=None, help="Validation images.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option(
    "--max-map-drop",
    type=float,
    default=0.5,
    show_default=True,
    help="Fail (exit 3) if the compiled mAP@[.5:.95] drops more (points).",
)
@click.option(
    "--tune-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Also search schedules for kernels the tuning database lacks (e.g. on a CPU the "
    "shipped demo records were not measured on), for at most this long.",
)
@click.pass_context
def demo_group(
    ctx: click.Context,
    output: Path,
    images: int | None,
    threads: int | None,
    max_map_drop: float,
    tune_minutes: float | None,
) -> None:
    """The main job on the demo detector detc ships: compile for this CPU, verify, benchmark.

    Makes (or reuses, from the cache) a synthetic validation set, compiles the demo detector with
    the default pipeline and tuned kernels (tuning records detc ships for the demo, merged into
    your tuning database), checks tensors, mAP and boxes against onnxruntime, and measures
    latency of both, interleaved, with the same threads. `detc demo train` retrains the detector.
    """
    if ctx.invoked_subcommand is not None:
        return
    from detc.compiler.demo.run import run_demo

    summary = run_demo(
        output,
        n_images=images,
        threads=threads,
        tune_minutes=tune_minutes,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(summary.table())
    if not summary.tensors_ok:
        raise VerificationMismatchError(f"{summary.artifact}: output tensors beyond tolerance")
    drop = (summary.map_reference - summary.map_compiled) * 100
    if drop > max_map_drop:
        raise VerificationMismatchError(
            f"{summary.artifact}: mAP@[.5:.95] dropped {drop:.2f} points (> {max_map_drop})"
        )


@demo_group.command("train")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=None, help="Training seed (default: the recipe's).")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option(
    "--min-map50",
    type=float,
    default=None,
    help="Fail (exit 1) if the held-out mAP@0.5 ends below this.",
)
def demo_train(output: Path, seed: int | None, epochs: int | None, min_map50: float | None) -> None:
    """Train the demo detector on synthetic data (CPU) and export it un-fused to -o."""
    import os

    # OpenMP threads that spin while waiting make each step 10x slower on a busy 2-core machine;
    # it must be set before torch (and its OpenMP runtime) is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from detc.compiler.demo.train import train_demo

    overrides = {k: v for k, v in {"seed": seed, "epochs": epochs}.items() if v is not None}
    result = train_demo(output, log=lambda m: click.echo(m, err=True), **overrides)
    click.echo(
        f"wrote {result.onnx_path} and {result.spec_path}: val mAP@0.5 {result.map50_val:.3f}, "
        f"mAP@[.5:.95] {result.map_val:.3f}, {result.parameters:,} params, "
        f"{result.gflops:.2f} GFLOPs, {result.seconds:.0f} s"
    )
    if min_map50 is not None and result.map50_val < min_map50:
        raise CheckFailedError(
            f"val mAP@0.5 {result.map50_val:.3f} is below --min-map50 {min_map50}"
        )
