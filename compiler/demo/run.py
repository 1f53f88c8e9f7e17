"""``detc demo``: the whole job on the detector detc ships — compile, verify in mAP, benchmark."""

from __future__ import annotations

import importlib.resources
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detc.compiler.errors import BadInputError
from detc.compiler.fileio import cache_dir

DEMO_ONNX = "demo_detector.onnx"
DEMO_SPEC = "demo_detector.json"
#: tuning records for the demo detector, exported with `detc tune --export-db` on the CPU the
#: project develops on (2 cores); merged into the user's tuning database before compiling
DEMO_TUNING = "demo_tuning.json.gz"
#: validation images `detc demo` checks by default: enough for a stable mAP, few enough that the
#: demo stays within a few minutes on two cores
DEFAULT_DEMO_IMAGES = 100


def demo_asset_paths() -> tuple[Path, Path]:
    """The shipped demo detector and its spec (inside the installed package)."""
    assets = Path(str(importlib.resources.files("detc.compiler") / "assets"))
    onnx_path, spec_path = assets / DEMO_ONNX, assets / DEMO_SPEC
    if not onnx_path.is_file() or not spec_path.is_file():
        raise BadInputError(
            f"{assets}: the demo detector is missing from this installation; "
            "train it with `detc demo train -o DIR`"
        )
    return onnx_path, spec_path


def demo_validation_set(spec_record: dict[str, Any], n_images: int | None = None) -> Path:
    """The demo's held-out synthetic validation split, generated once into the cache."""
    from detc.compiler.demo.synth import generate_dataset

    synth = spec_record.get("synth") or {}
    size = int(synth.get("image_size", spec_record["input_size"][0]))
    seed = int(synth.get("val_seed", 1))
    n = int(n_images or min(int(synth.get("n_val", DEFAULT_DEMO_IMAGES)), DEFAULT_DEMO_IMAGES))
    where = cache_dir() / "demo" / f"val-seed{seed}-n{n}-{size}px"
    if not (where / "instances.json").is_file():
        generate_dataset(where, n, seed, size)
    return where


@dataclass
class DemoSummary:
    artifact: Path
    report: Path
    map_reference: float
    map_compiled: float
    map50_reference: float
    map50_compiled: float
    ort_ms: float
    detc_ms: float
    ratio: float
    threads: int
    tuned: bool
    untuned_kernels: int
    tensors_ok: bool
    seconds: float

    def table(self) -> str:
        state = "tuned" if self.tuned else "partly tuned" if self.untuned_kernels else "untuned"
        return "\n".join(
            [
                "",
                f"{'demo detector':<26}{'onnxruntime':>14}{'detc (' + state + ')':>20}",
                f"{'mAP@[.5:.95]':<26}{self.map_reference:>14.3f}{self.map_compiled:>20.3f}",
                f"{'mAP@.5':<26}{self.map50_reference:>14.3f}{self.map50_compiled:>20.3f}",
                f"{'latency (median)':<26}{self.ort_ms:>12.2f}ms{self.detc_ms:>18.2f}ms",
                f"ratio detc/onnxruntime {self.ratio:.3f} ({self.threads} threads); "
                f"tensors {'match' if self.tensors_ok else 'MISMATCH'}; "
                f"done in {self.seconds:.0f} s",
                f"artifact: {self.artifact}",
                f"report:   {self.report / 'report.md'}",
            ]
        )


def run_demo(
    out_dir: Path,
    *,
    n_images: int | None = None,
    threads: int | None = None,
    bench_runs: int = 20,
    tune_minutes: float | None = None,
    log: Callable[[str], None] = print,
) -> DemoSummary:
    """Compile the shipped demo detector for this CPU, verify it, benchmark it vs onnxruntime.

    The build uses the tuned pipeline: the tuning records detc ships for the demo detector are
    merged into the user's tuning database first. On a CPU they were not measured on (another
    model or core count) they do not apply; the convolutions then get the template's default
    tiles and the summary says "partly tuned". ``tune_minutes`` searches for what is missing.
    """
    from detc.compiler.bench import bench_interleaved
    from detc.compiler.detection.report import DetectionReport
    from detc.compiler.detection.spec import load_spec
    from detc.compiler.driver import compile_model, default_threads, load
    from detc.compiler.reference import ort_session, run_session
    from detc.compiler.verify.artifact import verify_artifact

    started = time.perf_counter()
    n_threads = threads or default_threads()
    onnx_path, spec_path = demo_asset_paths()
    spec_record = json.loads(spec_path.read_text())
    val_dir = demo_validation_set(spec_record, n_images)
    log(f"[1/4] synthetic validation set: {val_dir}")
    artifact = Path(out_dir) / "artifact"
    log(f"[2/4] compiling {onnx_path.name} for this CPU (x86) → {artifact}")
    result = compile_model(
        onnx_path,
        target="x86",
        out_dir=artifact,
        model_spec=load_spec(spec_path),
        num_threads=n_threads,
        progress=True,
        target_options={"tuning": demo_tuning_options(tune_minutes, log)},
    )
    log(f"      {result.pipeline_run.records[0].before} → {result.pipeline_run.records[-1].after}")
    log("[3/4] verifying against onnxruntime: tensors, then mAP and boxes on every image")
    report_dir = Path(out_dir) / "report"
    verification = verify_artifact(
        artifact, reference=onnx_path, data=val_dir, report_dir=report_dir, threads=n_threads
    )
    report, manifest = verification.detection, verification.manifest
    assert isinstance(report, DetectionReport)  # the default pipeline keeps the demo float
    log("[4/4] benchmarking against onnxruntime (interleaved, same threads)")
    compiled = load(artifact, num_threads=n_threads)
    session = ort_session(onnx_path.read_bytes(), threads=n_threads)
    feeds = {spec_record["input_name"]: next(iter(report_feeds(val_dir, spec_path)))}
    bench = bench_interleaved(
        compiled.run,
        lambda f: run_session(session, f),
        feeds,
        a_name="detc",
        b_name="onnxruntime",
        threads=n_threads,
        runs=bench_runs,
    )
    assert report.candidate is not None  # a candidate runner was given
    reference, candidate = report.reference.metrics, report.candidate.metrics
    return DemoSummary(
        artifact=artifact,
        report=report_dir,
        map_reference=reference.map,
        map_compiled=candidate.map,
        map50_reference=reference.map50,
        map50_compiled=candidate.map50,
        ort_ms=bench.to_dict()["b"]["median_ms"],
        detc_ms=bench.to_dict()["a"]["median_ms"],
        ratio=bench.ratio,
        threads=n_threads,
        tuned=bool(manifest.get("tuning", {}).get("tuned")),
        untuned_kernels=int(manifest.get("tuning", {}).get("untuned_tasks", 0)),
        tensors_ok=verification.tensors.ok,
        seconds=time.perf_counter() - started,
    )


def demo_tuning_options(tune_minutes: float | None, log: Callable[[str], None]) -> Any:
    """TuningOptions for the demo build, after merging the shipped records (if installed) into
    the default tuning database."""
    from detc.targets.tuning.database import default_database_dir, import_records
    from detc.targets.tuning.search import TuningOptions

    shipped = Path(str(importlib.resources.files("detc.compiler") / "assets" / DEMO_TUNING))
    if shipped.is_file():
        added = import_records(default_database_dir(), shipped)
        if added:
            log(f"      merged {added} shipped tuning record(s) into {default_database_dir()}")
    return TuningOptions(tune=tune_minutes is not None, minutes=tune_minutes)


def report_feeds(val_dir: Path, spec_path: Path):
    """Preprocessed input tensors of the validation images (a real image for the benchmark)."""
    from detc.compiler.detection.datasets import CocoDataset
    from detc.compiler.detection.spec import load_spec

    spec = load_spec(spec_path)
    for sample in CocoDataset(val_dir, spec).samples(spec, 1):
        yield sample.tensor
