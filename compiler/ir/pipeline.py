"""Pipelines: text that round-trips, a TOML form that says the same, and an instrumented runner.

Grammar (whitespace around tokens is ignored; ``str()`` gives the canonical form back)::

    pipeline := step ("," step)*
    step     := pass-name ["{" key "=" value ("," key "=" value)* "}"]
    value    := text without , { } "   |   "quoted text"

``default`` as a step expands to :data:`DEFAULT_PIPELINE`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnx_ir as ir
import tomllib

from detc.compiler.errors import BadInputError, DetcError, PassError, VerificationMismatchError
from detc.compiler.fileio import cache_dir
from detc.compiler.ir.pass_base import DetcPass
from detc.compiler.ir.registry import get_pass
from detc.compiler.ir.stats import GraphStats, graph_stats
from detc.compiler.reference import graph_io, ort_session, random_feeds, run_session, to_proto
from detc.compiler.tensor_compare import TensorDiff, compare_outputs
from detc.compiler.tolerances import FP16, FP32_EXACT

#: What ``detc compile`` and ``detc opt`` run when no ``-p`` is given: exact passes only.
DEFAULT_PIPELINE = (
    "remove-identity,fold-constants,fold-conv-bn,fold-conv-mul-add,eliminate-dead-code"
)

_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class PipelineStep:
    """One pass of a pipeline with its options as written (values kept as text)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = ",".join(f"{k}={_quote_if_needed(v)}" for k, v in self.options)
        return f"{self.name}{{{body}}}"

    def instantiate(self) -> DetcPass:
        return get_pass(self.name).from_text_options(self.options)


def _quote_if_needed(value: str) -> str:
    return f'"{value}"' if any(c in value for c in ',{}" ') or value == "" else value


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[PipelineStep, ...]

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def instantiate(self) -> list[DetcPass]:
        """The pass objects; unknown names and bad options fail here, before any work is done."""
        return [step.instantiate() for step in self.steps]


def with_calibration_images(pipeline: Pipeline, folder: str) -> tuple[Pipeline, list[str]]:
    """``folder`` as the calibration images of every step whose pass declares a
    ``calibration_option`` the step does not set itself (``--calib DIR``); also those passes'
    names."""
    steps, given = [], []
    for step in pipeline.steps:
        key = get_pass(step.name).calibration_option
        if key is not None and key not in dict(step.options):
            step = PipelineStep(step.name, (*step.options, (key, folder)))
            given.append(step.name)
        steps.append(step)
    return Pipeline(tuple(steps)), given


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.fail(f"expected '{char}'")
        self.pos += 1

    def regex(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip_space()
        m = pattern.match(self.text, self.pos)
        if m is None:
            return self.fail(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        self.skip_space()
        if self.peek() == '"':
            end = self.text.find('"', self.pos + 1)
            if end < 0:
                self.fail("unterminated quoted value")
            raw = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return raw
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ',{}"':
            self.pos += 1
        raw = self.text[start : self.pos].strip()
        if not raw:
            self.fail("expected a value")
        return raw

    def fail(self, what: str) -> NoReturn:
        raise BadInputError(
            f"pipeline {self.text!r}: {what} at column {self.pos + 1} "
            "(form: pass,pass{key=value,key=value},...; `detc passes` lists the passes)"
        )


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text. Pass names are checked against the registry when instantiated."""
    scanner = _Scanner(text)
    steps: list[PipelineStep] = []
    if not text.strip():
        return Pipeline(())
    while True:
        # "<default>" (as the docs write a placeholder) means the same as "default"
        bracketed = scanner.peek() == "<"
        if bracketed:
            scanner.pos += 1
        name = scanner.regex(_NAME, "a kebab-case pass name")
        if bracketed:
            if name != "default":
                scanner.fail("only <default> may be written in angle brackets")
            scanner.expect(">")
        options: list[tuple[str, str]] = []
        if scanner.peek() == "{":
            scanner.expect("{")
            while True:
                key = scanner.regex(_KEY, "an option name")
                scanner.expect("=")
                options.append((key, scanner.value()))
                if scanner.peek() == ",":
                    scanner.pos += 1
                    continue
                scanner.expect("}")
                break
        if name == "default" and not options:
            steps.extend(parse_pipeline(DEFAULT_PIPELINE).steps)
        else:
            steps.append(PipelineStep(name, tuple(options)))
        if scanner.peek() == "":
            break
        scanner.expect(",")
    return Pipeline(tuple(steps))


def _toml_value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def pipeline_from_config(config: Mapping[str, Any], source: str = "config") -> Pipeline | None:
    """The pipeline a TOML config states: ``pipeline = "..."`` or ``[[passes]]`` tables.

    ``[[passes]]`` entries are ``{name = "lowrank", energy = 0.95}``: every key but ``name`` is an
    option. Both forms give the same :class:`Pipeline` as the equivalent ``-p`` text.
    """
    text = config.get("pipeline")
    tables = config.get("passes")
    if text is not None and tables is not None:
        raise BadInputError(f'{source}: give either `pipeline = "..."` or [[passes]], not both')
    if text is not None:
        if not isinstance(text, str):
            raise BadInputError(f'{source}: `pipeline` must be a string like "fold-conv-bn,..."')
        return parse_pipeline(text)
    if tables is None:
        return None
    steps = []
    for i, table in enumerate(tables):
        if not isinstance(table, dict) or "name" not in table:
            raise BadInputError(f"{source}: [[passes]] entry {i + 1} needs a `name`")
        opts = tuple((k, _toml_value_text(v)) for k, v in table.items() if k != "name")
        steps.append(PipelineStep(str(table["name"]), opts))
    return Pipeline(tuple(steps))


def load_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise BadInputError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{path}: not valid TOML ({exc})") from None


# --- running -------------------------------------------------------------------------------------


@dataclass
class PassRecord:
    """What the instruments saw for one pass."""

    step: str
    exact: bool
    modified: bool
    seconds: float
    before: GraphStats
    after: GraphStats
    drift: list[TensorDiff] | None = None
    dumped_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.step,
            "exact": self.exact,
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "before": vars(self.before),
            "after": vars(self.after),
            "drift": None if self.drift is None else [d.to_dict() for d in self.drift],
            "dumped_to": self.dumped_to,
        }


@dataclass
class PipelineRun:
    model: ir.Model
    pipeline: Pipeline
    records: list[PassRecord] = field(default_factory=list)

    def table(self) -> str:
        """The instruments as a terminal table."""
        header = f"{'pass':<34} {'time':>8} {'nodes':>13} {'params':>21} {'MMACs':>19}  drift"
        lines = [header, "-" * len(header)]
        for r in self.records:
            drift = "-"
            if r.drift:
                drift = f"{max(d.max_abs_error for d in r.drift):.2e}"
            lines.append(
                f"{r.step[:34]:<34} {r.seconds * 1000:>6.0f}ms "
                f"{r.before.nodes:>5} → {r.after.nodes:<5} "
                f"{r.before.parameters:>9,} → {r.after.parameters:<9,} "
                f"{r.before.macs / 1e6:>8.1f} → {r.after.macs / 1e6:<8.1f} {drift}"
            )
        return "\n".join(lines)


def _tolerance_for(outputs: Mapping[str, np.ndarray]):
    return FP16 if any(v.dtype == np.float16 for v in outputs.values()) else FP32_EXACT


def _write_reproducer(model: ir.Model, pipeline: Pipeline, step: PipelineStep) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    where = cache_dir() / "repro" / f"{stamp}-{step.name}"
    where.mkdir(parents=True, exist_ok=True)
    ir.save(model, where / "model.onnx")
    (where / "pipeline.txt").write_text(
        f"failing step: {step}\nfull pipeline: {pipeline}\n"
        f"reproduce: detc opt {where / 'model.onnx'} -p '{step}' -o /tmp/out.onnx --debug\n"
    )
    return where


def run_pipeline(
    model: ir.Model,
    pipeline: Pipeline,
    *,
    dump_ir: Path | None = None,
    verify_each: bool = False,
    feeds: Mapping[str, np.ndarray] | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> PipelineRun:
    """Run ``pipeline`` over ``model`` (in place), recording time and counts for every pass.

    ``verify_each`` runs the model in onnxruntime before and after every pass that changed it, on
    the same inputs, and stops at the first *exact* pass whose outputs drift beyond the tolerance
    table (approximate passes have their drift recorded; their budget is checked elsewhere).
    """
    passes = pipeline.instantiate()
    run = PipelineRun(model=model, pipeline=pipeline)
    if dump_ir is not None:
        dump_ir.mkdir(parents=True, exist_ok=True)
        ir.save(model, dump_ir / "00-input.onnx")
    reference: dict[str, np.ndarray] | None = None
    if verify_each:
        proto = to_proto(model)
        feeds = dict(feeds) if feeds is not None else random_feeds(graph_io(proto)[0])
        reference = run_session(ort_session(proto), feeds)
    stats = graph_stats(model)
    original: ir.Model | None = None
    keep_original = any(p.wants_original for p in passes)
    for index, (step, pass_) in enumerate(zip(pipeline.steps, passes, strict=True), start=1):
        snapshot = model.clone()
        if pass_.wants_original:
            pass_.original = original
        elif keep_original and original is None and not pass_.exact:
            original = snapshot  # the function the approximate passes from here on must keep
        started = time.perf_counter()
        try:
            result = pass_(model)
        except DetcError:
            raise
        except Exception as exc:
            where = _write_reproducer(snapshot, pipeline, step)
            raise PassError(
                f"pass '{step}' crashed ({type(exc).__name__}: {exc}); reproducer written to "
                f"{where} — rerun with --debug for the traceback"
            ) from exc
        seconds = time.perf_counter() - started
        model = result.model
        after = graph_stats(model) if result.modified else stats
        record = PassRecord(str(step), pass_.exact, result.modified, seconds, stats, after)
        if result.modified and reference is not None and feeds is not None:
            outputs = run_session(ort_session(model), feeds)
            record.drift = compare_outputs(outputs, reference, _tolerance_for(reference))
            bad = [d for d in record.drift if not d.within_tolerance]
            if bad and pass_.exact:
                worst = max(bad, key=lambda d: d.max_abs_error)
                raise VerificationMismatchError(
                    f"--verify-each: pass '{step}' (step {index}) changed output '{worst.name}' "
                    f"beyond tolerance (max abs {worst.max_abs_error:.3e}, rtol {worst.rtol} / "
                    f"atol {worst.atol}); rerun with --dump-ir DIR to inspect the graphs"
                )
            reference = outputs
        if result.modified and dump_ir is not None:
            path = dump_ir / f"{index:02d}-{step.name}.onnx"
            ir.save(model, path)
            record.dumped_to = str(path)
        run.records.append(record)
        if on_pass is not None:
            on_pass(record)
        stats = after
    run.model = model
    return run
