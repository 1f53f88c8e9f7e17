"""Verification: run an artifact and onnxruntime on the same inputs and compare what comes out."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError
from detc.compiler.reference import load_feeds, ort_session, random_feeds, run_session
from detc.compiler.tensor_compare import TensorDiff, compare_outputs
from detc.compiler.verify.quantization import (
    is_quantized,
    quantization_record,
    quantized_reference_path,
)
from detc.compiler.verify.runner import (
    artifact_batch_runner,
    manifest_inputs,
    read_manifest,
    reference_proto,
)


@dataclass
class TensorReport:
    """Per-output differences between an artifact and onnxruntime over one or more input sets."""

    diffs: list[TensorDiff]
    inputs: str
    emulated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.within_tolerance for d in self.diffs)

    def table(self) -> str:
        header = (
            f"{'output':<24} {'shape':<18} {'max abs':>10} {'max rel':>10} {'cosine':>10}  verdict"
        )
        lines = [header, "-" * len(header)]
        for d in self.diffs:
            verdict = "ok" if d.within_tolerance else f"MISMATCH (rtol {d.rtol}, atol {d.atol})"
            shape = "x".join(map(str, d.shape))
            lines.append(
                f"{d.name[:24]:<24} {shape:<18} {d.max_abs_error:>10.3e} "
                f"{d.max_rel_error:>10.3e} {d.cosine_similarity:>10.6f}  {verdict}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "inputs": self.inputs,
            "emulated": self.emulated,
            "notes": self.notes,
            "outputs": [d.to_dict() for d in self.diffs],
        }


def _merge(per_run: list[list[TensorDiff]]) -> list[TensorDiff]:
    """Worst case over runs, output by output."""
    merged: list[TensorDiff] = []
    for diffs in zip(*per_run, strict=True):
        worst = max(diffs, key=lambda d: (not d.within_tolerance, d.max_abs_error))
        merged.append(
            TensorDiff(
                worst.name,
                worst.shape,
                worst.dtype,
                max(d.max_abs_error for d in diffs),
                max(d.max_rel_error for d in diffs),
                min(d.cosine_similarity for d in diffs),
                worst.rtol,
                worst.atol,
                all(d.within_tolerance for d in diffs),
            )
        )
    return merged


def _feed_sets(
    manifest: Mapping[str, Any], inputs: str | None, seed: int, runs: int
) -> tuple[list[dict[str, np.ndarray]], str]:
    """The input sets both sides run on, and how to describe them in the report: ``inputs``
    (an .npz keyed by input name) or ``runs`` seeded random sets (seeds ``seed``, ``seed+1``...)."""
    specs = manifest_inputs(manifest)
    if inputs is not None:
        return [load_feeds(inputs, specs)], inputs
    feed_sets = [random_feeds(specs, seed + i) for i in range(runs)]
    return feed_sets, f"seeded random (seed {seed}, {runs} set{'s' if runs > 1 else ''})"


def verify_tensors(
    artifact_dir: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    *,
    inputs: str | None = None,
    seed: int = 0,
    runs: int = 1,
    num_threads: int | None = None,
    emulate: bool = False,
    device: str | None = None,
) -> TensorReport:
    """Run the artifact and the reference in onnxruntime on the same inputs; compare every output.

    Inputs come from ``inputs`` (an .npz keyed by input name) or are seeded random (``runs`` sets,
    seeds ``seed``, ``seed+1``, ...).
    """
    manifest = read_manifest(artifact_dir)
    feed_sets, described = _feed_sets(manifest, inputs, seed, runs)
    session = ort_session(reference_proto(reference, manifest), threads=num_threads or 0)
    expected = [run_session(session, f) for f in feed_sets]
    runner = artifact_batch_runner(
        artifact_dir, emulate=emulate, device=device, num_threads=num_threads
    )
    actual = runner(feed_sets)
    per_run = [compare_outputs(a, e) for a, e in zip(actual, expected, strict=True)]
    report = TensorReport(_merge(per_run), described, emulated=emulate)
    if emulate:
        report.notes.append("emulated: numerics only (no latency is measured under emulation)")
    return report


# --- int8 artifacts ----------------------------------------------------------------------------
#
# An int8 artifact is held to the quantized model it was compiled from (the QDQ ONNX saved in
# the artifact, run by onnxruntime), not to the float model: quantization itself moves yolov5n's
# boxes by up to ~130 px. Nor can it be held to the QDQ model element by element. The integer
# kernels sum exactly where onnxruntime sums dequantized floats, and SiLU's sigmoid differs in
# its last bits: a value that lands within that difference of a rounding boundary quantizes one
# step apart, and the step travels on through every layer after it. On yolov5n (x86 build,
# coco64 images) the share of activation codes that differ grows from <0.01 % after the first
# layer to ~25 % by the end of the backbone (up to 7 steps apart), and box coordinates end up as
# much as 60 px apart. A two-layer net, where nothing compounds, agrees to >140 dB.
#
# How far such rounding carries is a property of the quantized model, and onnxruntime measures
# it: the QDQ reference run again with every activation's dequantize scale moved by
# INT8_SCALE_JITTER (1e-5 relative: more than either side's float rounding, ~1e-6 on yolov5n's
# first conv) disagrees with itself as much as the artifact does (yolov5n, channel-mean SQNR:
# 23.7 to 25.2 dB jittered, artifact 25.5 to 26.2 dB; the tiny net: 77 dB jittered, artifact
# 143 dB). Hence, per output, over all input sets together, in channel-mean SQNR (each output
# channel counts the same, so class scores are not drowned by box coordinates in pixels):
# 1. agreement: the artifact's SQNR against the quantized reference is at most
#    INT8_MARGIN_DB below the jittered reference's (or above INT8_EXACT_SQNR_DB: float
#    precision). Simulated back-end bugs on yolov5n: an activation zero point off by one in one
#    layer 18 dB, a dropped bias 10 dB, truncating every requantization 15 dB (one only: 22 dB,
#    not caught); on the two-layer net an input zero point off by one 52 dB against 74.
# 2. no error of its own: the artifact's SQNR against the float model is at most
#    INT8_MAX_SQNR_LOSS_DB below the quantized reference's (yolov5n: -0.34 to +0.41 dB per
#    image or random input, +0.05 dB over 64 images; the zero point bug: 3 dB). Needs the float
#    model; skipped, with a note, without it.

#: relative change of every activation's dequantize scale in the jittered quantized reference
INT8_SCALE_JITTER = 1e-5
#: (1): dB the artifact's SQNR vs the quantized reference may fall below the jittered one's
INT8_MARGIN_DB = 3.0
#: (1): an SQNR (dB) this high is agreement at float precision, whatever the jittered one says
INT8_EXACT_SQNR_DB = 80.0
#: (2): how much further (dB of SQNR) from the float model the artifact may be than its reference
INT8_MAX_SQNR_LOSS_DB = 1.0
#: an exact channel (no noise) counts as this in the channel mean, as in quant-report's SQNRs
_EXACT_CHANNEL_DB = 200.0


def jittered_reference(model: Any, jitter: float = INT8_SCALE_JITTER) -> Any:
    """A copy of QDQ ``model`` (proto) whose activation dequantize scales are ``1 + jitter``
    times larger: how far float rounding in the intermediates carries through the model."""
    import onnx
    from onnx import numpy_helper

    jittered = onnx.ModelProto()
    jittered.CopyFrom(model)
    constants = {t.name: t for t in jittered.graph.initializer}
    for node in jittered.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants.setdefault(node.output[0], node.attribute[0].t)
    moved: set[str] = set()
    for node in jittered.graph.node:
        # weights and biases are constants: only scales of computed activations move
        if node.op_type != "DequantizeLinear" or node.input[0] in constants:
            continue
        scale = node.input[1]
        if scale in moved or scale not in constants:
            continue
        tensor = constants[scale]
        values = numpy_helper.to_array(tensor)
        tensor.CopyFrom(
            numpy_helper.from_array((values * (1.0 + jitter)).astype(values.dtype), tensor.name)
        )
        moved.add(scale)
    return jittered


def _channel_rows(values: np.ndarray) -> np.ndarray:
    """``values`` as (channels, elements) in float64, channels along ``channel_axis``."""
    from detc.passes.quantize.mixed_precision import channel_axis

    axis = channel_axis(values.shape)
    data = values.astype(np.float64)
    if axis is None:
        return data.reshape(1, -1)
    return np.moveaxis(data, axis, 0).reshape(values.shape[axis], -1)


class _ChannelNoise:
    """Signal and noise energy per output channel of a candidate against a reference, summed
    over input sets (an SQNR of the whole run, not a mean of per-set SQNRs)."""

    def __init__(self) -> None:
        self.signal: np.ndarray | None = None
        self.noise: np.ndarray | None = None

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref, cand = _channel_rows(reference), _channel_rows(candidate)
        finite = np.isfinite(ref) & np.isfinite(cand)
        both_same = (ref == cand) | ~(np.isfinite(ref) | np.isfinite(cand))
        noise = np.where(finite, (ref - cand) ** 2, np.where(both_same, 0.0, np.inf)).sum(axis=1)
        signal = np.where(np.isfinite(ref), ref**2, 0.0).sum(axis=1)
        self.signal = signal if self.signal is None else self.signal + signal
        self.noise = noise if self.noise is None else self.noise + noise

    def sqnr_db(self) -> float:
        """Mean over channels of each channel's SQNR in dB (an exact channel counts 200 dB)."""
        if self.signal is None or self.noise is None:
            return _EXACT_CHANNEL_DB
        with np.errstate(divide="ignore"):
            per_channel = 10.0 * np.log10(np.maximum(self.signal, 1e-300) / self.noise)
        return float(np.mean(np.minimum(per_channel, _EXACT_CHANNEL_DB)))


@dataclass(frozen=True)
class QuantizedOutputAgreement:
    """How one output of an int8 artifact agrees with its quantized reference (and the float)."""

    name: str
    shape: tuple[int, ...]
    sqnr_db: float  # channel-mean SQNR against the quantized reference
    jittered_sqnr_db: float  # ... of the jittered quantized reference against the reference
    max_abs_error: float
    p99_abs_error: float  # the 99th percentile of |artifact - reference|, worst input set
    artifact_float_sqnr_db: float | None = None  # the artifact against the float model
    reference_float_sqnr_db: float | None = None  # the quantized reference against the float model
    problem: str = ""  # a missing output or a shape mismatch

    @property
    def least_sqnr_db(self) -> float:
        """The SQNR against the quantized reference that criterion (1) asks for."""
        return min(self.jittered_sqnr_db - INT8_MARGIN_DB, INT8_EXACT_SQNR_DB)

    @property
    def sqnr_loss_db(self) -> float | None:
        """dB of SQNR against the float model the artifact has less than its reference."""
        if self.artifact_float_sqnr_db is None or self.reference_float_sqnr_db is None:
            return None
        return self.reference_float_sqnr_db - self.artifact_float_sqnr_db

    def failures(self) -> list[str]:
        if self.problem:
            return [self.problem]
        found = []
        if self.sqnr_db < self.least_sqnr_db:
            found.append(
                f"SQNR {self.sqnr_db:.1f} dB < {self.least_sqnr_db:.1f} (jittered reference "
                f"{self.jittered_sqnr_db:.1f} - {INT8_MARGIN_DB:g})"
            )
        loss = self.sqnr_loss_db
        if loss is not None and loss > INT8_MAX_SQNR_LOSS_DB:
            found.append(f"{loss:.2f} dB further from float than the reference")
        return found

    @property
    def ok(self) -> bool:
        return not self.failures()

    def verdict(self) -> str:
        found = self.failures()
        return "ok" if not found else "MISMATCH (" + "; ".join(found) + ")"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(vars(self))
        out.update(least_sqnr_db=self.least_sqnr_db, sqnr_loss_db=self.sqnr_loss_db, ok=self.ok)
        return out


class Int8Agreement:
    """Accumulates, output by output, an int8 artifact against its quantized reference, the
    jittered reference against the reference and, given, both against the float model, over
    input sets; :meth:`results` applies the criterion."""

    def __init__(self) -> None:
        self.sets = 0
        self._vs_reference: dict[str, _ChannelNoise] = {}
        self._jittered: dict[str, _ChannelNoise] = {}
        self._artifact_vs_float: dict[str, _ChannelNoise] = {}
        self._reference_vs_float: dict[str, _ChannelNoise] = {}
        self._max_abs: dict[str, float] = {}
        self._p99_abs: dict[str, float] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._problems: dict[str, str] = {}

    def add(
        self,
        artifact: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        jittered: Mapping[str, np.ndarray],
        float_outputs: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """One input set: the outputs of the artifact, the quantized reference, the jittered
        reference and (optional) the float model."""
        self.sets += 1
        for name, expected in reference.items():
            expected = np.asarray(expected)
            self._shapes.setdefault(name, tuple(expected.shape))
            self._jittered.setdefault(name, _ChannelNoise()).add(
                expected, np.asarray(jittered[name])
            )
            if name not in artifact:
                self._problems[name] = "missing from the artifact's outputs"
                continue
            actual = np.asarray(artifact[name])
            if actual.shape != expected.shape:
                found, wanted = list(actual.shape), list(expected.shape)
                self._problems[name] = f"shape {found}, expected {wanted}"
                continue
            self._vs_reference.setdefault(name, _ChannelNoise()).add(expected, actual)
            error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
            error = np.where(np.isnan(error), np.inf, error)
            if error.size:
                self._max_abs[name] = max(self._max_abs.get(name, 0.0), float(error.max()))
                p99 = float(np.quantile(error, 0.99))
                self._p99_abs[name] = max(self._p99_abs.get(name, 0.0), p99)
            if float_outputs is not None and name in float_outputs:
                exact = np.asarray(float_outputs[name])
                if exact.shape == expected.shape:
                    self._artifact_vs_float.setdefault(name, _ChannelNoise()).add(exact, actual)
                    self._reference_vs_float.setdefault(name, _ChannelNoise()).add(exact, expected)

    def results(self) -> list[QuantizedOutputAgreement]:
        out = []
        for name, shape in self._shapes.items():
            problem = self._problems.get(name, "")
            vs_float = name in self._artifact_vs_float and not problem
            out.append(
                QuantizedOutputAgreement(
                    name,
                    shape,
                    self._vs_reference[name].sqnr_db() if not problem else -math.inf,
                    self._jittered[name].sqnr_db(),
                    self._max_abs.get(name, math.inf if problem else 0.0),
                    self._p99_abs.get(name, math.inf if problem else 0.0),
                    self._artifact_vs_float[name].sqnr_db() if vs_float else None,
                    self._reference_vs_float[name].sqnr_db() if vs_float else None,
                    problem,
                )
            )
        return out


def format_db(value: float | None) -> str:
    """An SQNR for reports: ``27.3 dB``, ``-`` when not measured."""
    return "-" if value is None else f"{value:.1f} dB"


@dataclass
class QuantizedTensorReport:
    """An int8 artifact's outputs against its quantized reference (and the float model)."""

    outputs: list[QuantizedOutputAgreement]
    inputs: str
    quantization: dict[str, Any]
    quantized_reference: str
    float_reference: str | None
    emulated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def table(self) -> str:
        header = (
            f"{'output':<16} {'shape':<14} {'SQNR vs QDQ':>11} {'least':>8} {'max abs':>9} "
            f"{'p99 abs':>9} {'vs float: detc':>14} {'QDQ':>8}  verdict"
        )
        lines = [header, "-" * len(header)]
        for o in self.outputs:
            shape = "x".join(map(str, o.shape))
            lines.append(
                f"{o.name[:16]:<16} {shape:<14} {format_db(o.sqnr_db):>11} "
                f"{format_db(o.least_sqnr_db):>8} "
                f"{o.max_abs_error:>9.3g} {o.p99_abs_error:>9.3g} "
                f"{format_db(o.artifact_float_sqnr_db):>14} "
                f"{format_db(o.reference_float_sqnr_db):>8}  "
                f"{o.verdict()}"
            )
        lines.append(criterion_line())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "inputs": self.inputs,
            "emulated": self.emulated,
            "notes": self.notes,
            "quantized_reference": self.quantized_reference,
            "float_reference": self.float_reference,
            "quantization": self.quantization,
            "criterion": int8_criterion(),
            "outputs": [o.to_dict() for o in self.outputs],
        }


def int8_criterion() -> dict[str, float]:
    """The constants of the int8 criterion, for reports."""
    return {
        "scale_jitter": INT8_SCALE_JITTER,
        "margin_db": INT8_MARGIN_DB,
        "exact_sqnr_db": INT8_EXACT_SQNR_DB,
        "max_sqnr_loss_db": INT8_MAX_SQNR_LOSS_DB,
    }


def criterion_line() -> str:
    return (
        "int8 criterion (channel-mean SQNR): vs the quantized reference at most "
        f"{INT8_MARGIN_DB:g} dB below that reference's own vs itself with activation scales "
        f"jittered by {INT8_SCALE_JITTER:g} (or above {INT8_EXACT_SQNR_DB:g} dB); vs float at "
        f"most {INT8_MAX_SQNR_LOSS_DB:g} dB below the reference's"
    )


def verify_quantized_tensors(
    artifact_dir: str | os.PathLike[str],
    float_reference: str | os.PathLike[str] | None,
    *,
    inputs: str | None = None,
    seed: int = 0,
    runs: int = 1,
    num_threads: int | None = None,
    emulate: bool = False,
    device: str | None = None,
) -> QuantizedTensorReport:
    """Run an int8 artifact, its quantized reference and (given) the float model on the same
    inputs; hold the artifact to the int8 criterion above. Inputs as in :func:`verify_tensors`.
    """
    manifest = read_manifest(artifact_dir)
    record = quantization_record(manifest)
    if record is None:
        raise BadInputError(f"{artifact_dir}: not an int8 artifact (no quantization record)")
    qdq_path = quantized_reference_path(artifact_dir, record)
    feed_sets, described = _feed_sets(manifest, inputs, seed, runs)
    threads = num_threads or 0
    qdq_proto = reference_proto(qdq_path, manifest)
    qdq_session = ort_session(qdq_proto, threads=threads)
    quantized = [run_session(qdq_session, f) for f in feed_sets]
    jittered_session = ort_session(jittered_reference(qdq_proto), threads=threads)
    jittered = [run_session(jittered_session, f) for f in feed_sets]
    exact: list[dict[str, np.ndarray] | None] = [None] * len(feed_sets)
    notes = []
    float_proto = None if float_reference is None else reference_proto(float_reference, manifest)
    if float_proto is not None and is_quantized(float_proto):
        notes.append(f"{float_reference} is itself quantized: not used as the float model")
        float_proto = None
    if float_proto is not None:
        float_session = ort_session(float_proto, threads=threads)
        exact = [run_session(float_session, f) for f in feed_sets]
    else:
        notes.append(
            "no float model: the artifact's distance from float was not compared "
            "(give --reference FLOAT.onnx)"
        )
    runner = artifact_batch_runner(
        artifact_dir, emulate=emulate, device=device, num_threads=num_threads
    )
    agreement = Int8Agreement()
    for actual, expected, moved, reference in zip(
        runner(feed_sets), quantized, jittered, exact, strict=True
    ):
        agreement.add(actual, expected, moved, reference)
    if emulate:
        notes.append("emulated: numerics only (no latency is measured under emulation)")
    return QuantizedTensorReport(
        agreement.results(),
        described,
        dict(record),
        str(qdq_path),
        None if float_reference is None else str(float_reference),
        emulated=emulate,
        notes=notes,
    )
