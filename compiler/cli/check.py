"""``detc verify`` and ``detc bench``: is the artifact right, and how fast is it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from detc.compiler.cli.options import (
    decoder_option,
    device_options,
    device_url,
    echo_err,
    json_option,
    max_images_option,
    threads_option,
    verify_config_option,
)
from detc.compiler.errors import BadInputError, CheckFailedError


@click.command("verify")
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
    help="Labelled dataset (DIR/images + DIR/instances.json, COCO's annotations/ + <split>/, "
    "or an Ultralytics data.yaml): verify in mAP and boxes too.",
)
@decoder_option
@max_images_option
@click.option(
    "--max-map-drop",
    type=float,
    default=None,
    help="Fail (exit 3) if mAP@[.5:.95] drops by more than this many points (int8 artifacts: "
    "against the float model; default: the compile's max_map_drop, else 1.0).",
)
@click.option(
    "--min-reference-map",
    type=float,
    default=1.0,
    show_default=True,
    help="With --data: fail if the reference model's own mAP@.5 (points) is below this — a "
    "reference that finds nothing means the preprocessing or decoder do not match the model "
    "(0 turns the check off, e.g. for untrained weights).",
)
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where report.json / report.md go (default: ARTIFACT/report).",
)
@threads_option
@verify_config_option
@json_option("Print the tensor report as JSON.")
def verify_cmd(
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
    min_reference_map: float,
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
    from detc.compiler.verify.artifact import VerificationReport, verify_artifact

    def show_tensors(report: VerificationReport) -> None:
        if as_json:
            click.echo(json.dumps(report.tensors.to_dict(), indent=2))
        else:
            click.echo("\n".join(report.tensor_lines()))

    report = verify_artifact(
        artifact,
        reference=reference,
        inputs=inputs,
        seed=seed,
        runs=runs,
        data=data,
        decoder=decoder,
        max_images=max_images,
        max_map_drop=max_map_drop,
        min_reference_map=min_reference_map,
        report_dir=report_dir,
        emulate=emulate,
        device=device_url(device, rpc_tracker, rpc_key),
        threads=threads,
        on_tensors=show_tensors,
    )
    for line in report.detection_lines():
        click.echo(line, err=as_json)  # with --json, stdout holds only the JSON
    report.raise_for_failures()
    click.echo("verify: ok", err=as_json)


@click.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--vs",
    "versus",
    default="onnxruntime",
    show_default=True,
    help="'onnxruntime' (runs --reference), 'openvino' (OpenVINO fp32 on --reference, with "
    "onnxruntime too; needs pip install 'detc[bench]'), another artifact folder, or several of "
    "these separated by commas, all in one interleaved run.",
)
@click.option("--reference", type=click.Path(path_type=Path), default=None)
@device_options
@threads_option
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True)
@json_option("Print the result as JSON.")
@click.option(
    "--max-ratio",
    type=float,
    default=None,
    help="Fail (exit 1) if median(artifact)/median(other) exceeds this (with a list or "
    "openvino: against each contestant named in --vs).",
)
def bench_cmd(
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
    """Latency of ARTIFACT against onnxruntime, OpenVINO or another artifact, interleaved.

    Same input, same thread count, warm-up first, then runs alternate ABBA. Prints median and p90
    of each and `ratio A/B` (below 1.0: the artifact is faster).

    \b
    --vs openvino (or a list, e.g. onnxruntime,openvino): detc, onnxruntime fp32 and
    OpenVINO fp32 (CPU plugin, PERFORMANCE_HINT=LATENCY, INFERENCE_NUM_THREADS=--threads,
    precision pinned to f32) in one run, the order rotated every round. Both run the
    float reference (the artifact's reference.onnx, also for int8 artifacts). Prints each
    one's median/p90 and ratio to onnxruntime, and detc's ratio to OpenVINO; --max-ratio
    applies to every contestant named in --vs.
    """
    from detc.compiler.bench import bench_interleaved
    from detc.compiler.driver import default_threads, load
    from detc.compiler.reference import ort_session, random_feeds, run_session
    from detc.compiler.verify.artifact import default_reference
    from detc.compiler.verify.runner import manifest_inputs, read_manifest, reference_proto
    from detc.targets import MANIFEST_FILE

    contestants = [c.strip() for c in versus.split(",") if c.strip()]
    several = len(contestants) > 1 or "openvino" in contestants
    if several and (device or rpc_tracker):
        raise BadInputError("--vs with openvino or a list runs on this machine only (no --device)")
    if "openvino" in contestants:
        from detc.compiler.bench import require_openvino

        require_openvino()  # before loading anything: the missing extra is the error to show
    manifest = read_manifest(artifact)
    if manifest.get("prepost", {}).get("preprocess"):
        raise BadInputError(
            f"{artifact} takes images (compiled with --with-preprocess), the references take the "
            "network's tensor: bench an artifact compiled without it, or time the whole pipeline "
            "with `detc package` and `bin/detc-run BUNDLE IMAGE.ppm --runs N`"
        )
    n = threads or default_threads()
    feeds = random_feeds(manifest_inputs(manifest))
    device = device_url(device, rpc_tracker, rpc_key)
    if device is not None:
        _bench_on_device(artifact, versus, device, feeds, threads, runs, as_json, max_ratio)
        return
    if several:
        _bench_several(
            artifact, manifest, contestants, reference, feeds, n, warmup, runs, as_json, max_ratio
        )
        return
    a = load(artifact, num_threads=n)
    if versus == "onnxruntime":
        ref = reference or default_reference(manifest, artifact)
        session = ort_session(reference_proto(ref, manifest), threads=n)
        b_name = f"onnxruntime ({Path(ref).name})"

        def run_b(f: Any) -> Any:
            return run_session(session, f)
    else:
        other = Path(versus)
        if not (other / MANIFEST_FILE).is_file():
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


def _bench_several(
    artifact: Path,
    manifest: dict[str, Any],
    contestants: list[str],
    reference: Path | None,
    feeds: dict[str, Any],
    threads: int,
    warmup: int,
    runs: int,
    as_json: bool,
    max_ratio: float | None,
) -> None:
    """detc, onnxruntime fp32 (always: the baseline) and the rest of --vs, in one run."""
    from detc.compiler.bench import bench_round_robin, openvino_runner
    from detc.compiler.driver import load
    from detc.compiler.reference import ort_session, run_session
    from detc.compiler.verify.artifact import default_reference
    from detc.compiler.verify.runner import manifest_inputs, reference_proto
    from detc.targets import MANIFEST_FILE

    ref = Path(reference or default_reference(manifest, artifact))
    runners: dict[str, Any] = {"detc": load(artifact, num_threads=threads).run}
    notes = {"detc": f"{artifact}"}
    session = ort_session(reference_proto(ref, manifest), threads=threads)
    runners["onnxruntime"] = lambda f: run_session(session, f)
    notes["onnxruntime"] = f"onnxruntime fp32 on {ref}"
    named = []
    for contestant in contestants:
        if contestant == "onnxruntime":
            named.append("onnxruntime")
        elif contestant == "openvino":
            shapes = {s.name: tuple(int(d) for d in s.shape) for s in manifest_inputs(manifest)}
            openvino = openvino_runner(ref, shapes, threads)
            runners["openvino"], notes["openvino"] = openvino.run, openvino.note
            if openvino.threads != threads:
                echo_err(
                    f"detc: warning: OpenVINO uses {openvino.threads} thread(s), not {threads}: "
                    "this process may run on fewer CPUs (see taskset -p)"
                )
            named.append("openvino")
        elif (Path(contestant) / MANIFEST_FILE).is_file():
            name = f"detc ({contestant})"
            runners[name] = load(Path(contestant), num_threads=threads).run
            named.append(name)
        else:
            raise BadInputError(
                f"--vs {contestant}: neither 'onnxruntime', 'openvino' nor a detc artifact folder"
            )
    result = bench_round_robin(
        runners,
        feeds,
        baseline="onnxruntime",
        threads=threads,
        warmup=warmup,
        runs=runs,
        progress=not as_json,
    )
    result.notes = notes
    pairs = [("detc", name) for name in runners if name != "detc"]
    if as_json:
        click.echo(json.dumps(result.to_dict(pairs), indent=2))
    else:
        click.echo(result.table(pairs))
    if max_ratio is not None:
        over = [n for n in named if result.ratio("detc", n) > max_ratio]
        if over:
            worst = max(over, key=lambda n: result.ratio("detc", n))
            raise CheckFailedError(
                f"ratio detc / {worst} {result.ratio('detc', worst):.3f} exceeds --max-ratio "
                f"{max_ratio}"
            )


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
        echo_err(
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
