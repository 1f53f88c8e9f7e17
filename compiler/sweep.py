"""Measured trade-off of an approximate pass: MACs, latency and mAP per setting.

``detc sweep MODEL --pass prune --values 0.1,0.2,0.3 --data DATASET --decoder NAME`` runs, for
each value, the base pipeline followed by the pass with its sweep option set to that value
(``prune{ratio=0.2}``) and by the ``then`` passes (``recover{minutes=20}``: the mAP after
recovery), then measures the result against the base model on the same footing: MACs from shape
inference, latency interleaved with the base model in one onnxruntime process (same input, same
thread count), with ``target`` also detc's own latency (both compiled with detc's default build,
timed interleaved), and COCO mAP on the dataset. A table and a plot come out.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler.bench import bench_interleaved
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError
from detc.compiler.ir.stats import graph_stats
from detc.compiler.reference import graph_io, ort_session, random_feeds, run_session, to_proto

SWEEP_PLOT = "sweep.png"


@dataclass(frozen=True)
class SweepPoint:
    """One setting of the swept option, measured."""

    value: str
    pipeline: str
    macs: int
    parameters: int
    mac_reduction: float  # against the base model, 0..1
    latency_ms: float  # median, interleaved with the base model
    base_latency_ms: float  # median of the base model in the same interleaved run
    map: float | None  # COCO mAP@[.5:.95], 0..1
    map50: float | None
    #: detc's compiled build of the candidate and of the base model, interleaved (with a target)
    detc_latency_ms: float | None = None
    detc_base_latency_ms: float | None = None

    @property
    def latency_reduction(self) -> float:
        """1 - candidate / base latency (medians of the same interleaved run)."""
        return 1.0 - self.latency_ms / self.base_latency_ms

    @property
    def detc_latency_reduction(self) -> float | None:
        if self.detc_latency_ms is None or not self.detc_base_latency_ms:
            return None
        return 1.0 - self.detc_latency_ms / self.detc_base_latency_ms

    def to_dict(self) -> dict[str, Any]:
        reduction = self.detc_latency_reduction
        return {
            **vars(self),
            "latency_reduction": round(self.latency_reduction, 4),
            "detc_latency_reduction": None if reduction is None else round(reduction, 4),
        }


@dataclass
class SweepResult:
    model: str
    pass_name: str
    option: str
    base_pipeline: str
    threads: int
    base_macs: int
    base_map: float | None
    base_map50: float | None
    points: list[SweepPoint] = field(default_factory=list)
    plot: str | None = None
    target: str | None = None  # detc's latency measured for this target too

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pass": self.pass_name,
            "option": self.option,
            "base_pipeline": self.base_pipeline,
            "threads": self.threads,
            "base_macs": self.base_macs,
            "base_map": self.base_map,
            "base_map50": self.base_map50,
            "points": [p.to_dict() for p in self.points],
            "plot": self.plot,
            "target": self.target,
        }

    def table(self) -> str:
        def points(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.2f}"

        def drop(value: float | None, base: float | None) -> str:
            return "-" if value is None or base is None else f"{100 * (base - value):+.2f}"

        detc = self.target is not None
        header = (
            f"{self.option:>12} {'MMACs':>9} {'-MACs':>7} {'onnxruntime':>11} {'-latency':>9} "
            + (f"{'detc':>10} {'-latency':>9} " if detc else "")
            + f"{'mAP':>7} {'drop':>7} {'mAP50':>7} {'drop':>7}"
        )
        blank = f"{'':>10} {'':>9} " if detc else ""
        lines = [
            f"sweep of {self.pass_name} over {self.option} on {self.model} "
            f"(base: {self.base_pipeline or 'no passes'}, {self.threads} threads"
            + (f"; detc: default build for {self.target}" if detc else "")
            + ")",
            header,
            f"{'base':>12} {self.base_macs / 1e6:>9.1f} {'':>7} {'':>11} {'':>9} {blank}"
            f"{points(self.base_map):>7} {'':>7} {points(self.base_map50):>7} {'':>7}",
        ]
        for p in self.points:
            compiled = ""
            if detc and p.detc_latency_ms is not None:
                compiled = (
                    f"{p.detc_latency_ms:>8.2f}ms {100 * (p.detc_latency_reduction or 0.0):>8.1f}% "
                )
            lines.append(
                f"{p.value:>12} {p.macs / 1e6:>9.1f} {100 * p.mac_reduction:>6.1f}% "
                f"{p.latency_ms:>9.2f}ms {100 * p.latency_reduction:>8.1f}% {compiled}"
                f"{points(p.map):>7} {drop(p.map, self.base_map):>7} "
                f"{points(p.map50):>7} {drop(p.map50, self.base_map50):>7}"
            )
        return "\n".join(lines)


def sweep(
    model: str | os.PathLike[str],
    pass_name: str,
    values: Sequence[float | str],
    *,
    data: str | os.PathLike[str] | None = None,
    decoder: str | None = None,
    spec: ModelSpec | None = None,
    option: str | None = None,
    pass_options: str = "",
    base_pipeline: str = "default",
    threads: int = 2,
    runs: int = 20,
    warmup: int = 3,
    max_images: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    plot: str | os.PathLike[str] | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_point: Callable[[SweepPoint], None] | None = None,
    then: str = "",
    target: str | None = None,
) -> SweepResult:
    """Measure ``pass_name`` at each of ``values`` of its sweep option (or ``option``).

    ``pass_options`` are further options of the pass, as pipeline text (``calib=DIR,multiple=16``).
    ``data`` is a COCO-format dataset (images/ + instances.json); without it no mAP is measured.
    ``spec`` defaults to the one inferred from the model, ``decoder`` overrides its decoder.
    ``plot`` is where the PNG goes (default: none); ``save_dir`` keeps each candidate model as
    ``<option>-<value>.onnx``. Latency is the median of ``runs`` runs of each model, interleaved
    with the base model's. ``then`` is pipeline text run after the swept pass (e.g.
    ``recover{minutes=20,images=DIR}``); ``target`` (e.g. ``x86``) also compiles the base model
    and every candidate with detc's default build and times them interleaved.
    """
    from detc.compiler.driver import optimize
    from detc.compiler.ir.pipeline import parse_pipeline
    from detc.compiler.ir.registry import get_pass

    if not values:
        raise BadInputError("sweep: give at least one value (--values 0.1,0.2,...)")
    pass_cls = get_pass(pass_name)
    chosen = option or pass_cls.sweep_option
    if not chosen:
        raise BadInputError(
            f"sweep: pass '{pass_name}' names no sweep option; give one with --option NAME"
        )
    extra = f",{pass_options.strip(',')}" if pass_options.strip(",") else ""
    pipelines = [
        ",".join(s for s in (base_pipeline, f"{pass_name}{{{chosen}={v}{extra}}}", then) if s)
        for v in values
    ]
    for text in pipelines:  # a typo in an option fails here, before the long measurements
        parse_pipeline(text).instantiate()

    if target is not None:
        from detc.targets import resolve_target

        resolve_target(target)  # a misspelt target fails before the long measurements
    base_loaded, _ = optimize(model, base_pipeline or "", input_shapes=input_shapes)
    base_proto = to_proto(base_loaded.model)
    base_session = ort_session(base_proto, threads=threads)
    feeds = random_feeds(graph_io(base_proto)[0])
    evaluate = _evaluator(model, data, spec, decoder, max_images, progress)
    base_metrics = evaluate(lambda f: run_session(base_session, f))
    result = SweepResult(
        model=str(model),
        pass_name=pass_name,
        option=chosen,
        base_pipeline=base_pipeline,
        threads=threads,
        base_macs=graph_stats(base_loaded.model).macs,
        base_map=None if base_metrics is None else base_metrics[0],
        base_map50=None if base_metrics is None else base_metrics[1],
        target=target,
    )
    with tempfile.TemporaryDirectory(prefix="detc-sweep-") as builds:
        measure = _PointMeasurer(
            model=model,
            input_shapes=input_shapes,
            save_dir=Path(save_dir) if save_dir is not None else None,
            option=chosen,
            threads=threads,
            feeds=feeds,
            evaluate=evaluate,
            base_session=base_session,
            base_macs=result.base_macs,
            warmup=warmup,
            runs=runs,
            progress=progress,
            builds=_Builds(target, Path(builds), threads) if target is not None else None,
        )
        measure.build_base(base_loaded)
        for value, text in zip(values, pipelines, strict=True):
            point = measure(str(value), text)
            result.points.append(point)
            if on_point is not None:
                on_point(point)
    if plot is not None:
        result.plot = str(write_plot(result, Path(plot)))
    return result


Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class _Builds:
    """detc's default build of each model for ``target``, in ``folder``, loaded to run here."""

    target: str
    folder: Path
    threads: int

    def build(self, loaded: Any, name: str) -> Runner:
        from detc.compiler.driver import compile_model
        from detc.compiler.ir.pipeline import Pipeline
        from detc.targets import load_artifact

        out = self.folder / name
        # the model is already transformed: no passes, the target's default build
        compile_model(
            loaded,
            target=self.target,
            out_dir=out,
            pipeline=Pipeline(()),
            num_threads=self.threads,
            progress=False,
        )
        return load_artifact(out, num_threads=self.threads).run


@dataclass
class _PointMeasurer:
    """Everything a setting is measured against: the base model's session, build and mAP."""

    model: str | os.PathLike[str]
    input_shapes: Mapping[str, tuple[int, ...]] | None
    save_dir: Path | None
    option: str
    threads: int
    feeds: dict[str, np.ndarray]
    evaluate: Callable[[Runner], tuple[float, float] | None]
    base_session: Any
    base_macs: int
    warmup: int
    runs: int
    progress: bool
    builds: _Builds | None
    base_build: Runner | None = None

    def build_base(self, loaded: Any) -> None:
        if self.builds is not None:
            self.base_build = self.builds.build(loaded, "base")

    def _timed(self, candidate: Runner, base: Runner, name: str) -> tuple[float, float]:
        timing = bench_interleaved(
            candidate,
            base,
            self.feeds,
            a_name=name,
            b_name="base",
            threads=self.threads,
            warmup=self.warmup,
            runs=self.runs,
            progress=self.progress,
        )
        return float(np.median(timing.a_ms)), float(np.median(timing.b_ms))

    def __call__(self, value: str, text: str) -> SweepPoint:
        from detc.compiler.driver import optimize

        loaded, _ = optimize(self.model, text, input_shapes=self.input_shapes)
        stats = graph_stats(loaded.model)
        proto = to_proto(loaded.model)
        if self.save_dir is not None:
            _save(proto, self.save_dir / f"{self.option}-{value}.onnx")
        session = ort_session(proto, threads=self.threads)

        def candidate(f: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return run_session(session, f)

        metrics = self.evaluate(candidate)
        latency, base_latency = self._timed(
            candidate, lambda f: run_session(self.base_session, f), text
        )
        detc_latency = detc_base_latency = None
        if self.builds is not None and self.base_build is not None:
            build = self.builds.build(loaded, f"{self.option}-{value}")
            detc_latency, detc_base_latency = self._timed(build, self.base_build, text)
        return SweepPoint(
            value=value,
            pipeline=text,
            macs=stats.macs,
            parameters=stats.parameters,
            mac_reduction=1.0 - stats.macs / self.base_macs if self.base_macs else 0.0,
            latency_ms=latency,
            base_latency_ms=base_latency,
            map=None if metrics is None else metrics[0],
            map50=None if metrics is None else metrics[1],
            detc_latency_ms=detc_latency,
            detc_base_latency_ms=detc_base_latency,
        )


def _evaluator(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str] | None,
    spec: ModelSpec | None,
    decoder: str | None,
    max_images: int | None,
    progress: bool,
) -> Callable[[Runner], tuple[float, float] | None]:
    """mAP@[.5:.95] and mAP@.5 of a runner on ``data`` (None without data)."""
    if data is None:
        return lambda runner: None
    from detc.compiler.detection.datasets import CocoDataset
    from detc.compiler.detection.report import evaluate_detection
    from detc.compiler.detection.spec import spec_from_onnx

    dataset = CocoDataset(data)
    chosen = spec if spec is not None else spec_from_onnx(Path(model))
    if decoder is not None:
        chosen = chosen.with_overrides(decoder=decoder)

    def evaluate(runner: Runner) -> tuple[float, float] | None:
        report = evaluate_detection(
            runner, None, dataset, chosen, max_images=max_images, progress=progress
        )
        return report.reference.metrics.map, report.reference.metrics.map50

    return evaluate


def _save(proto: Any, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, path)


def write_plot(result: SweepResult, path: Path) -> Path:
    """MAC reduction against latency reduction and mAP, one point per setting (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * p.mac_reduction for p in result.points]
    figure, (speed, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    speed.plot(x, [100 * p.latency_reduction for p in result.points], "o-", label="onnxruntime")
    compiled = [p.detc_latency_reduction for p in result.points]
    if result.target is not None and all(r is not None for r in compiled):
        speed.plot(x, [100 * (r or 0.0) for r in compiled], "s-", label=f"detc ({result.target})")
    top = max([*x, 1.0])
    speed.plot([0, top], [0, top], ":", color="grey", label="latency ∝ MACs")
    speed.set_xlabel("MAC reduction (%)")
    speed.set_ylabel("latency reduction (%)")
    speed.set_title(f"{result.threads} threads, interleaved medians")
    speed.legend()
    if result.base_map is not None:
        accuracy.plot(x, [100 * (p.map or 0.0) for p in result.points], "o-", label="mAP@[.5:.95]")
        accuracy.axhline(100 * result.base_map, color="C0", linestyle=":")
    if result.base_map50 is not None:
        accuracy.plot(x, [100 * (p.map50 or 0.0) for p in result.points], "s-", label="mAP@.5")
        accuracy.axhline(100 * result.base_map50, color="C1", linestyle=":")
    accuracy.set_xlabel("MAC reduction (%)")
    accuracy.set_ylabel("mAP (x100); dotted: base model")
    if result.base_map is None:
        accuracy.text(0.5, 0.5, "no dataset: mAP not measured", ha="center", va="center")
    else:
        accuracy.legend()
    for point, xi in zip(result.points, x, strict=True):
        speed.annotate(point.value, (xi, 100 * point.latency_reduction), fontsize=8)
    figure.suptitle(f"{result.pass_name} sweep over {result.option}: {Path(result.model).name}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        Path(tmp).unlink(missing_ok=True)
    return path
