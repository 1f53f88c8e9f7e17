"""lowrank: factorize Gemm / MatMul / Conv weights into cheaper products (approximate).

Forms, all in float64 and cast back to the weight's dtype:

* **svd** (Gemm, MatMul, 1x1 Conv): ``W ≈ F2 F1`` from a truncated SVD, as two products (two
  1x1 Convs): ``r (C + N)`` MACs per output pixel instead of ``C N``.
* **tucker2** (kxk Conv): 1x1 Conv to ``r1`` channels -> kxk core ``r1 -> r2`` (the original
  stride, padding, dilation) -> 1x1 Conv to ``N`` with the bias. From a higher-order SVD: the
  leading singular vectors of the weight's input- and output-channel unfoldings.
* **spatial** (kxk Conv): a kx1 Conv to ``r`` channels, then a 1xk Conv to ``N``: the SVD of
  the weight seen as a (C*kh) x (N*kw) matrix (separable in height and width).

Each layer takes the form with the fewest MACs at its ranks. A rank keeps ``energy`` of the
spectrum (squared singular values), rounded up to ``multiple``; ``mac_reduction`` instead finds
one energy threshold for the whole model that removes that share of its MACs. Layers whose best
form does not cut their MACs by ``min_saving`` are left alone, and ``detc explain`` says so.

With ``calib`` images the spectra are those of the data: the output side keeps the principal
directions of the layer's *output* covariance (so ``W ≈ U U^T W`` with the bias absorbing the
mean: the best rank-r approximation of the layer's response on that data), the input side
is whitened by the input covariance before the SVD, and the last factor and bias are then refit
by least squares to reproduce the original output on the calibration patches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import scipy.linalg

from detc.compiler.ir.pass_base import Candidate, DetcPass, NoMatch, PassResult, node_label
from detc.passes._graph_facts import (
    ONNX_DOMAINS,
    add_initializer,
    constant_array,
    describe_node,
    drop_if_unused,
)
from detc.passes.calibration import (
    ConvGeometry,
    calibration_feeds,
    collect,
    extract_patches,
    sample_positions,
    static_facts,
)

logger = logging.getLogger(__name__)

FORMS = ("svd", "tucker2", "spatial")
#: relative floor under covariance eigenvalues before whitening: a direction the data never
#: uses must not be blown up by the inverse square root
_WHITEN_FLOOR = 1e-6
_RIDGE = 1e-6


def _option(default: Any, help: str) -> Any:
    """A dataclass field whose ``metadata["help"]`` documents it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class LowRankOptions:
    """Options of ``lowrank`` (pipeline text: ``lowrank{energy=0.95}``).

    Each field's ``metadata["help"]`` says what it does (for ``detc passes -v``).
    """

    energy: float = _option(0.95, "share of each layer's spectral energy the kept ranks hold")
    mac_reduction: float | None = _option(
        None, "instead: remove this share of the model's MACs (one energy threshold for all)"
    )
    multiple: int = _option(
        16,
        "ranks are rounded up to multiples of this: 16 fp32 lanes suit AVX-512 (onnxruntime's "
        "NCHWc kernels need it) and are whole multiples of AVX2's 8 and NEON's 4",
    )
    min_saving: float = _option(
        0.4,
        "a factorized layer must cut its own MACs by this share, else it is left alone: two or "
        "three smaller convs cost more per MAC than one (onnxruntime, demo detector at -30 % "
        "MACs: 0.4 ran 3-5 % faster than 0.2, same mAP)",
    )
    forms: str = _option("svd,tucker2,spatial", "the forms allowed (comma-separated)")
    calib: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "folder of images (or a COCO dataset folder) for the data-aware factorization"
    )
    calib_images: int = _option(16, "how many calibration images to draw (with `seed`)")
    spec: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "preprocessing of the calib images (model spec JSON/TOML); default: inferred"
    )
    samples: int = _option(512, "output pixels sampled per image and layer for the statistics")
    seed: int = _option(0, "seed of every random draw (calibration images, sampled pixels)")

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy={self.energy} must be in (0, 1]")
        if self.mac_reduction is not None and not 0.0 <= self.mac_reduction < 1.0:
            raise ValueError(f"mac_reduction={self.mac_reduction} must be in [0, 1)")
        if self.multiple < 1:
            raise ValueError(f"multiple={self.multiple} must be at least 1")
        if self.min_saving >= 1.0:
            raise ValueError(f"min_saving={self.min_saving} must be below 1")
        unknown = set(self.form_list) - set(FORMS)
        if unknown or not self.form_list:
            raise ValueError(f"forms={self.forms!r}: choose among {', '.join(FORMS)}")
        if self.calib_images < 1 or self.samples < 1:
            raise ValueError("calib_images and samples must be at least 1")

    @property
    def form_list(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.forms.split(",") if f.strip())


# --- what a layer is and what it could become --------------------------------------------------


@dataclass
class _Layer:
    """A factorizable node with its weight as an (out, in) operator and its costs."""

    node: ir.Node
    kind: str  # "conv" or "dense" (Gemm / MatMul)
    weight: np.ndarray  # Conv: (N, C, kh, kw); dense: (N, K) so that y = W x
    bias: np.ndarray | None  # (N,) float64, None when the node has none
    macs: int
    geometry: ConvGeometry | None = None
    rows: int = 0  # dense: rows of the input (every leading axis)
    moments: np.ndarray | None = None  # data: sum of [x, 1][x, 1]^T over sampled patches/rows
    spectra: dict[str, tuple[np.ndarray, ...]] = field(default_factory=dict)

    @property
    def is_pointwise(self) -> bool:
        return self.kind == "dense" or self.weight.shape[2:] == (1, 1)

    @property
    def matrix(self) -> np.ndarray:
        """(N, C*kh*kw): the layer as a matrix acting on im2col patches (or rows)."""
        return self.weight.reshape(self.weight.shape[0], -1).astype(np.float64)


@dataclass(frozen=True)
class _Plan:
    form: str
    ranks: tuple[int, ...]
    macs: int


@dataclass(frozen=True)
class LayerDecision:
    name: str
    form: str  # "" when left alone
    ranks: tuple[int, ...]
    macs_before: int
    macs_after: int
    error: float | None = None  # relative squared output error on calibration data
    reason: str = ""


@dataclass
class LowRankReport:
    options: str
    macs_before: int
    macs_after: int
    energy: float
    layers: list[LayerDecision] = field(default_factory=list)
    calib_images: int = 0

    @property
    def mac_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "energy": self.energy,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "mac_reduction": round(self.mac_reduction, 4),
            "calib_images": self.calib_images,
            "layers": [vars(d) for d in self.layers],
        }

    def table(self) -> str:
        done = [d for d in self.layers if d.form]
        lines = [
            f"lowrank: {len(done)} of {len(self.layers)} layers factorized at energy "
            f"{self.energy:.4f}, MACs {self.macs_before / 1e6:,.1f} M -> "
            f"{self.macs_after / 1e6:,.1f} M (-{100 * self.mac_reduction:.1f} %)"
        ]
        for d in self.layers:
            if d.form:
                error = "" if d.error is None else f"  error {d.error:.4f}"
                lines.append(
                    f"  {d.name[:44]:<44} {d.form:<8} ranks {','.join(map(str, d.ranks)):<9} "
                    f"{d.macs_before / 1e6:7.2f} -> {d.macs_after / 1e6:6.2f} M{error}"
                )
            else:
                lines.append(f"  {d.name[:44]:<44} left alone: {d.reason}")
        return "\n".join(lines)


# --- the pass ---------------------------------------------------------------------------------


class LowRankPass(DetcPass):
    """Low-rank factorization of Gemm/MatMul/Conv weights (SVD, Tucker-2, spatial SVD).

    Per layer the form that cuts most MACs at ranks keeping ``energy`` of the spectrum (or one
    global threshold meeting ``mac_reduction``), ranks rounded up to ``multiple``; with ``calib``
    the spectra are the data's (output principal components, whitened inputs) and the last
    factor and bias are refit by least squares. Layers whose MACs would not fall by
    ``min_saving`` are left alone.
    """

    name = "lowrank"
    exact = False
    Options = LowRankOptions
    #: the option ``detc sweep`` varies
    sweep_option: ClassVar[str] = "mac_reduction"

    options: LowRankOptions

    def __init__(self, options: LowRankOptions | None = None) -> None:
        super().__init__(options)
        self.report: LowRankReport | None = None

    def explain(self, model: ir.Model) -> list[Candidate]:
        """Weight-only decisions (calibration statistics are not gathered to explain)."""
        layers, rejected = _layers(model, self.options)
        energy = self.options.energy if self.options.mac_reduction is None else None
        threshold = energy if energy is not None else _threshold(layers, self.options)
        lines = [Candidate(node_label(n), n.op_type, False, r.reason) for n, r in rejected]
        for layer in layers:
            plan = _best_plan(layer, threshold, self.options)
            if isinstance(plan, NoMatch):
                lines.append(
                    Candidate(node_label(layer.node), layer.node.op_type, False, plan.reason)
                )
            else:
                lines.append(Candidate(node_label(layer.node), layer.node.op_type, True))
        return lines

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        layers, rejected = _layers(model, opts)
        total = sum(static_facts(model)[1].values())
        report = LowRankReport(str(opts), total, total, opts.energy)
        self.report = report
        if opts.calib is not None and layers:
            feeds = calibration_feeds(
                model, opts.calib, max_images=opts.calib_images, seed=opts.seed, spec_path=opts.spec
            )
            _gather_moments(model, layers, feeds, opts)
            report.calib_images = len(feeds)
        threshold = opts.energy if opts.mac_reduction is None else _threshold(layers, opts)
        report.energy = threshold
        report.layers = [
            LayerDecision(node_label(n), "", (), 0, 0, reason=r.reason) for n, r in rejected
        ]
        saved = 0
        for layer in layers:
            plan = _best_plan(layer, threshold, opts)
            label = node_label(layer.node)
            if isinstance(plan, NoMatch):
                report.layers.append(
                    LayerDecision(label, "", (), layer.macs, layer.macs, reason=plan.reason)
                )
                continue
            error = _factorize(model.graph, layer, plan)
            saved += layer.macs - plan.macs
            report.layers.append(
                LayerDecision(label, plan.form, plan.ranks, layer.macs, plan.macs, error)
            )
        report.macs_after = total - saved
        logger.info("%s", report.table())
        return PassResult(model, saved != 0 or any(d.form for d in report.layers))


# --- candidates -------------------------------------------------------------------------------


def _layers(
    model: ir.Model, opts: LowRankOptions
) -> tuple[list[_Layer], list[tuple[ir.Node, NoMatch]]]:
    geometry, macs = static_facts(model)
    layers: list[_Layer] = []
    rejected: list[tuple[ir.Node, NoMatch]] = []
    for node in model.graph:
        if node.domain not in ONNX_DOMAINS or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        found = _candidate(node, geometry.get(node), macs.get(node, 0), opts)
        if isinstance(found, NoMatch):
            rejected.append((node, found))
        else:
            layers.append(found)
    return layers, rejected


def _candidate(
    node: ir.Node, geometry: ConvGeometry | None, macs: int, opts: LowRankOptions
) -> _Layer | NoMatch:
    label = describe_node(node)
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype.kind != "f":
        return NoMatch(f"{label} has no constant float weight")
    if not macs:
        return NoMatch(f"{label} has no static shapes to count its MACs")
    if node.op_type == "Conv":
        if node.attributes.get_int("group", 1) != 1:
            return NoMatch(f"{label} is a grouped Conv (only group=1 is factorized)")
        if weight.ndim != 4 or geometry is None:
            return NoMatch(f"{label} is not a 2-D Conv with static shapes")
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = constant_array(bias_value)
        if bias_value is not None and bias is None:
            return NoMatch(f"{label} has a runtime bias")
        if weight.shape[2:] == (1, 1) and "svd" not in opts.form_list:
            return NoMatch(f"{label} is 1x1 and forms={opts.forms} excludes svd")
        if weight.shape[2:] != (1, 1) and not {"tucker2", "spatial"} & set(opts.form_list):
            return NoMatch(f"{label} is {weight.shape[2]}x{weight.shape[3]}: no kxk form chosen")
        return _Layer(
            node, "conv", weight, None if bias is None else bias.astype(np.float64), macs, geometry
        )
    if "svd" not in opts.form_list:
        return NoMatch(f"{label}: forms={opts.forms} excludes svd")
    if weight.ndim != 2:
        return NoMatch(f"{label} weight has rank {weight.ndim}; only 2-D weights are factorized")
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return NoMatch(f"{label} has transA=1")
        c_value = node.inputs[2] if len(node.inputs) > 2 else None
        c = constant_array(c_value)
        if c_value is not None and c is None:
            return NoMatch(f"{label} has a runtime C")
        matrix = weight if node.attributes.get_int("transB", 0) else weight.T
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        bias = None
        if c is not None:
            if c.size not in (1, matrix.shape[0]):
                return NoMatch(f"{label} C is not a per-output bias")
            bias = np.broadcast_to(c.astype(np.float64).reshape(-1), (matrix.shape[0],)) * beta
        layer = _Layer(node, "dense", matrix * alpha, bias, macs)
    else:
        layer = _Layer(node, "dense", weight.T.copy(), None, macs)
    layer.rows = macs // (layer.weight.shape[0] * layer.weight.shape[1])
    return layer


# --- statistics -------------------------------------------------------------------------------


def _gather_moments(
    model: ir.Model,
    layers: Sequence[_Layer],
    feeds: Sequence[dict[str, np.ndarray]],
    opts: LowRankOptions,
) -> None:
    for layer in layers:
        dim = layer.matrix.shape[1] + 1
        layer.moments = np.zeros((dim, dim))

    def visit(image: int, acts: dict[str, np.ndarray]) -> None:
        for ordinal, layer in enumerate(layers):
            x = acts[_input_name(layer.node)]
            rng = np.random.default_rng([opts.seed, ordinal, image])
            if layer.geometry is not None:
                positions = sample_positions(layer.geometry, opts.samples, rng)
                rows = extract_patches(x, layer.geometry, positions)
            else:
                flat = x.reshape(-1, x.shape[-1])
                count = min(opts.samples, flat.shape[0])
                rows = flat[np.sort(rng.choice(flat.shape[0], size=count, replace=False))]
            rows = np.hstack([rows.astype(np.float64), np.ones((rows.shape[0], 1))])
            assert layer.moments is not None
            layer.moments += rows.T @ rows

    collect(model, [_input_name(layer.node) for layer in layers], feeds, visit)


def _input_name(node: ir.Node) -> str:
    value = node.inputs[0]
    assert value is not None and value.name
    return value.name


def _covariance(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centered covariance and mean of x from the sum of [x, 1][x, 1]^T."""
    count = max(moments[-1, -1], 1.0)
    mean = moments[:-1, -1] / count
    return moments[:-1, :-1] / count - np.outer(mean, mean), mean


def _sqrt_and_inverse(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    floor = _WHITEN_FLOOR * max(float(values.max()), 1e-30)
    values = np.maximum(values, floor)
    root = np.sqrt(values)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def _channel_covariance(layer: _Layer, vertical: bool) -> np.ndarray:
    """Covariance of one input pixel's channels (or of a kh x 1 column's), from patch moments."""
    assert layer.moments is not None
    covariance, _ = _covariance(layer.moments)
    channels, kh, kw = layer.weight.shape[1:]
    blocks = covariance.reshape(channels, kh, kw, channels, kh, kw)
    if vertical:  # average over the kw columns of a patch
        return np.mean([blocks[:, :, j, :, :, j] for j in range(kw)], axis=0).reshape(
            channels * kh, channels * kh
        )
    return np.mean([blocks[:, i, j, :, i, j] for i in range(kh) for j in range(kw)], axis=0)


# --- spectra, ranks, MACs ----------------------------------------------------------------------


def _spectra(layer: _Layer, form: str) -> tuple[np.ndarray, ...]:
    """Energies (descending) whose cumulative share picks each rank of ``form``."""
    if form in layer.spectra:
        return layer.spectra[form]
    weight = layer.weight.astype(np.float64)
    data = layer.moments is not None
    if form == "svd":
        matrix = layer.matrix
        if data:
            covariance, _ = _covariance(layer.moments)  # type: ignore[arg-type]
            result: tuple[np.ndarray, ...] = (_output_energies(matrix, covariance),)
        else:
            result = (np.linalg.svd(matrix, compute_uv=False) ** 2,)
    elif form == "tucker2":
        n, c = weight.shape[:2]
        out_unfold = weight.reshape(n, -1)
        in_unfold = weight.transpose(1, 0, 2, 3).reshape(c, -1)
        if data:
            covariance, _ = _covariance(layer.moments)  # type: ignore[arg-type]
            root, _ = _sqrt_and_inverse(_channel_covariance(layer, vertical=False))
            result = (
                np.linalg.svd(root @ in_unfold, compute_uv=False) ** 2,
                _output_energies(out_unfold, covariance),
            )
        else:
            result = (
                np.linalg.svd(in_unfold, compute_uv=False) ** 2,
                np.linalg.svd(out_unfold, compute_uv=False) ** 2,
            )
    else:
        matrix = _spatial_matrix(weight)
        if data:
            root, _ = _sqrt_and_inverse(_channel_covariance(layer, vertical=True))
            matrix = root @ matrix
        result = (np.linalg.svd(matrix, compute_uv=False) ** 2,)
    layer.spectra[form] = result
    return result


def _output_energies(matrix: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    values = np.linalg.eigvalsh(matrix @ covariance @ matrix.T)
    return np.maximum(values[::-1], 0.0)


def _spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """W[n, c, i, j] as M[(c, i), (n, j)]: a kh x 1 Conv then a 1 x kw Conv computes M."""
    n, c, kh, kw = weight.shape
    return weight.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)


def _rank_for(energies: np.ndarray, threshold: float, multiple: int) -> int:
    total = float(energies.sum())
    full = len(energies)
    if total <= 0:
        return min(multiple, full)
    needed = int(np.searchsorted(np.cumsum(energies) / total, threshold - 1e-12) + 1)
    return min(full, math.ceil(min(needed, full) / multiple) * multiple)


def _plan_macs(layer: _Layer, form: str, ranks: tuple[int, ...]) -> int:
    n, c = layer.weight.shape[:2]
    if layer.kind == "dense":
        return layer.rows * ranks[0] * (c + n)
    geometry = layer.geometry
    assert geometry is not None
    out_pixels = geometry.out_pixels
    if form == "svd":
        return out_pixels * ranks[0] * (c + n)
    kh, kw = layer.weight.shape[2:]
    in_pixels = geometry.in_size[0] * geometry.in_size[1]
    if form == "tucker2":
        r1, r2 = ranks
        return in_pixels * r1 * c + out_pixels * r2 * r1 * kh * kw + out_pixels * n * r2
    (r,) = ranks
    column_pixels = geometry.out_size[0] * geometry.in_size[1]  # the kh x 1 Conv keeps the width
    return column_pixels * r * c * kh + out_pixels * n * r * kw


def _forms_for(layer: _Layer, opts: LowRankOptions) -> list[str]:
    if layer.is_pointwise:
        return ["svd"]
    return [f for f in ("tucker2", "spatial") if f in opts.form_list]


def _best_plan(layer: _Layer, threshold: float, opts: LowRankOptions) -> _Plan | NoMatch:
    plans = []
    for form in _forms_for(layer, opts):
        ranks = tuple(_rank_for(e, threshold, opts.multiple) for e in _spectra(layer, form))
        plans.append(_Plan(form, ranks, _plan_macs(layer, form, ranks)))
    best = min(plans, key=lambda p: p.macs)
    limit = (1.0 - opts.min_saving) * layer.macs
    if best.macs > limit:
        listed = ",".join(map(str, best.ranks))
        return NoMatch(
            f"{describe_node(layer.node)}: best form {best.form} (ranks {listed}) keeps "
            f"{100 * best.macs / layer.macs:.0f} % of its MACs; min_saving={opts.min_saving} "
            f"needs at most {100 * (1 - opts.min_saving):.0f} %"
        )
    return best


def _threshold(layers: Sequence[_Layer], opts: LowRankOptions) -> float:
    """The highest energy threshold whose factorizations remove ``mac_reduction`` of MACs."""
    assert opts.mac_reduction is not None
    total = sum(layer.macs for layer in layers)

    def saved(threshold: float) -> int:
        result = 0
        for layer in layers:
            plan = _best_plan(layer, threshold, opts)
            if not isinstance(plan, NoMatch):
                result += layer.macs - plan.macs
        return result

    goal = opts.mac_reduction * total
    low, high = 0.0, 1.0
    if saved(high) >= goal:
        return high
    for _ in range(40):
        middle = (low + high) / 2
        if saved(middle) >= goal:
            low = middle
        else:
            high = middle
    return low


# --- building the factors ---------------------------------------------------------------------


def _factorize(graph: ir.Graph, layer: _Layer, plan: _Plan) -> float | None:
    """Replace ``layer.node`` by its factorized form; returns the estimated relative error."""
    build = {"svd": _svd_factors, "tucker2": _tucker_factors, "spatial": _spatial_factors}
    factors, apply = build[plan.form](layer, plan.ranks)
    last, bias = factors[-1], layer.bias
    error = None
    if layer.moments is not None:
        last, bias = _refit_last(layer, factors, apply)
        factors = [*factors[:-1], last]
    if layer.moments is not None:
        error = _relative_error(layer, apply(factors), bias)
    _emit(graph, layer, plan.form, factors, bias)
    return error


FactorApply = Callable[[list[np.ndarray]], np.ndarray]


def _svd_factors(layer: _Layer, ranks: tuple[int, ...]) -> tuple[list[np.ndarray], FactorApply]:
    (r,) = ranks
    matrix = layer.matrix
    if layer.moments is not None:
        covariance, _ = _covariance(layer.moments)
        vectors = np.linalg.eigh(matrix @ covariance @ matrix.T)[1]
        basis = vectors[:, ::-1][:, :r]
        first, second = basis.T @ matrix, basis
    else:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        root = np.sqrt(s[:r])
        first, second = root[:, None] * vt[:r], u[:, :r] * root
    return [first, second], lambda f: f[1] @ f[0]


def _tucker_factors(layer: _Layer, ranks: tuple[int, ...]) -> tuple[list[np.ndarray], FactorApply]:
    r1, r2 = ranks
    weight = layer.weight.astype(np.float64)
    n, c = weight.shape[:2]
    in_unfold = weight.transpose(1, 0, 2, 3).reshape(c, -1)
    out_unfold = weight.reshape(n, -1)
    if layer.moments is not None:
        covariance, _ = _covariance(layer.moments)
        root, inverse_root = _sqrt_and_inverse(_channel_covariance(layer, vertical=False))
        p = np.linalg.svd(root @ in_unfold, full_matrices=False)[0][:, :r1]
        project_in = p.T @ inverse_root  # (r1, C): what the first 1x1 Conv computes
        lift_in = root @ p  # (C, r1): how the core reads the projected channels
        vectors = np.linalg.eigh(out_unfold @ covariance @ out_unfold.T)[1]
        out_basis = vectors[:, ::-1][:, :r2]
    else:
        p = np.linalg.svd(in_unfold, full_matrices=False)[0][:, :r1]
        project_in, lift_in = p.T, p
        out_basis = np.linalg.svd(out_unfold, full_matrices=False)[0][:, :r2]
    core = np.einsum("nchw,cj,nk->kjhw", weight, lift_in, out_basis, optimize=True)
    first = project_in[:, :, None, None]
    last = out_basis[:, :, None, None]

    def apply(f: list[np.ndarray]) -> np.ndarray:
        composed = np.einsum(
            "ok,kjhw,jc->ochw", f[2][:, :, 0, 0], f[1], f[0][:, :, 0, 0], optimize=True
        )
        return composed.reshape(composed.shape[0], -1)

    return [first, core, last], apply


def _spatial_factors(layer: _Layer, ranks: tuple[int, ...]) -> tuple[list[np.ndarray], FactorApply]:
    (r,) = ranks
    weight = layer.weight.astype(np.float64)
    n, c, kh, kw = weight.shape
    matrix = _spatial_matrix(weight)
    if layer.moments is not None:
        root, inverse_root = _sqrt_and_inverse(_channel_covariance(layer, vertical=True))
        u, s, vt = np.linalg.svd(root @ matrix, full_matrices=False)
        column = inverse_root @ u[:, :r]  # (C*kh, r)
        row = s[:r, None] * vt[:r]  # (r, N*kw)
    else:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        root_s = np.sqrt(s[:r])
        column, row = u[:, :r] * root_s, root_s[:, None] * vt[:r]
    vertical = column.T.reshape(r, c, kh, 1)
    horizontal = row.reshape(r, n, kw).transpose(1, 0, 2)[:, :, None, :]

    def apply(f: list[np.ndarray]) -> np.ndarray:
        composed = np.einsum("nrj,rci->ncij", f[1][:, :, 0, :], f[0][:, :, :, 0])
        return composed.reshape(composed.shape[0], -1)

    return [vertical, horizontal], apply


def _refit_last(
    layer: _Layer, factors: list[np.ndarray], apply: FactorApply
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares refit of the last factor and the bias to the original responses.

    The earlier factors map a patch x to features h = F x; the last one is linear in h, so the
    refit needs only the patch second moments: min E||W x + b - G h - b'||^2.
    """
    assert layer.moments is not None
    last = factors[-1]
    out_channels = last.shape[0]
    features = _feature_map(layer, factors)  # (H, D): h = features @ x
    augmented = np.zeros((features.shape[0] + 1, features.shape[1] + 1))
    augmented[:-1, :-1] = features
    augmented[-1, -1] = 1.0
    target = np.hstack([layer.matrix, _bias(layer)[:, None]])  # (N, D+1)
    gram = augmented @ layer.moments @ augmented.T
    cross = augmented @ layer.moments @ target.T
    ridge = _RIDGE * max(float(np.trace(gram[:-1, :-1])) / max(gram.shape[0] - 1, 1), 1e-30)
    regularized = gram + ridge * np.eye(gram.shape[0])
    regularized[-1, -1] = gram[-1, -1]
    try:
        theta = scipy.linalg.solve(regularized, cross, assume_a="pos")
    except (np.linalg.LinAlgError, ValueError):
        theta = np.linalg.lstsq(regularized, cross, rcond=None)[0]
    new_last = theta[:-1].T.reshape(out_channels, *last.shape[1:])
    return new_last, theta[-1]


def _feature_map(layer: _Layer, factors: list[np.ndarray]) -> np.ndarray:
    """The linear map from an input patch to what the last factor reads, in its weight order."""
    if len(factors) == 2 and layer.is_pointwise:  # svd: h = F1 x
        return factors[0] if factors[0].ndim == 2 else factors[0][:, :, 0, 0]
    c, kh, kw = layer.weight.shape[1:]
    if len(factors) == 3:  # tucker2: h[k] = sum_j core[k, j, i, l] (A x)[j, i, l]
        project = factors[0][:, :, 0, 0]  # (r1, C)
        mapped = np.einsum("kjhw,jc->kchw", factors[1], project)
        return mapped.reshape(mapped.shape[0], -1)
    # spatial: h[(r, l)] = sum_{c, i} V[r, c, i] x[c, i, l]
    vertical = factors[0][:, :, :, 0]  # (r, C, kh)
    r = vertical.shape[0]
    mapped = np.zeros((r, kw, c, kh, kw))
    for column in range(kw):
        mapped[:, column, :, :, column] = vertical
    return mapped.reshape(r * kw, c * kh * kw)


def _bias(layer: _Layer) -> np.ndarray:
    return np.zeros(layer.weight.shape[0]) if layer.bias is None else layer.bias


def _relative_error(layer: _Layer, approx: np.ndarray, bias: np.ndarray | None) -> float:
    """Relative squared error of the factorized layer's output over the calibration patches."""
    assert layer.moments is not None
    count = max(layer.moments[-1, -1], 1.0)
    original = np.hstack([layer.matrix, _bias(layer)[:, None]])
    new_bias = np.zeros(original.shape[0]) if bias is None else bias
    difference = original - np.hstack([approx, new_bias[:, None]])
    error = np.einsum("ij,jk,ik->", difference, layer.moments, difference, optimize=True)
    covariance, _ = _covariance(layer.moments)
    variance = (
        np.einsum("ij,jk,ik->", layer.matrix, covariance, layer.matrix, optimize=True) * count
    )
    return float(max(error, 0.0) / max(variance, 1e-30))


# --- emitting nodes ---------------------------------------------------------------------------


def _emit(
    graph: ir.Graph, layer: _Layer, form: str, factors: list[np.ndarray], bias: np.ndarray | None
) -> None:
    node = layer.node
    label = node_label(node)
    dtype = layer.weight.dtype
    x = node.inputs[0]
    assert x is not None
    new_nodes: list[ir.Node] = []

    def constant(name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{label}_{name}", np.ascontiguousarray(array.astype(dtype)))

    def conv(
        source: ir.Value,
        weight: np.ndarray,
        suffix: str,
        bias_array: np.ndarray | None,
        **attributes: Any,
    ) -> ir.Value:
        inputs = [source, constant(f"{suffix}_weight", weight)]
        if bias_array is not None:
            inputs.append(constant(f"{suffix}_bias", bias_array))
        name = f"{label}/lowrank_{suffix}"
        # named outputs: onnxruntime profiles and error messages show the layer, not "val_17"
        output = ir.Value(name=f"{name}_output_0")
        created = ir.node("Conv", inputs, attributes=attributes, name=name, outputs=[output])
        new_nodes.append(created)
        return output

    if layer.kind == "dense":
        first, second = factors
        hidden = _dense(node, x, constant("u_weight", first), new_nodes, label, "u")
        out = _dense(node, hidden, constant("v_weight", second), new_nodes, label, "v")
        if bias is not None and np.any(bias):
            add = ir.node(
                "Add",
                [out, constant("bias", bias)],
                name=f"{label}/lowrank_bias",
                outputs=[ir.Value(name=f"{label}/lowrank_bias_output_0")],
            )
            new_nodes.append(add)
            out = add.outputs[0]
    else:
        geometry = layer.geometry
        assert geometry is not None
        top, left, bottom, right = geometry.pads
        (sh, sw), (dh, dw) = geometry.strides, geometry.dilations
        if form == "svd":
            hidden = conv(
                x,
                factors[0].reshape(*factors[0].shape[:2], 1, 1)
                if factors[0].ndim == 2
                else factors[0],
                "u",
                None,
                strides=[sh, sw],
                pads=[top, left, bottom, right],
            )
            out = conv(hidden, factors[1].reshape(*factors[1].shape[:2], 1, 1), "v", bias)
        elif form == "tucker2":
            hidden = conv(x, factors[0], "in", None)
            core = conv(
                hidden,
                factors[1],
                "core",
                None,
                strides=[sh, sw],
                pads=[top, left, bottom, right],
                dilations=[dh, dw],
            )
            out = conv(core, factors[2], "out", bias)
        else:
            hidden = conv(
                x,
                factors[0],
                "vertical",
                None,
                strides=[sh, 1],
                pads=[top, 0, bottom, 0],
                dilations=[dh, 1],
            )
            out = conv(
                hidden,
                factors[1],
                "horizontal",
                bias,
                strides=[1, sw],
                pads=[0, left, 0, right],
                dilations=[1, dw],
            )
    old = node.outputs[0]
    out.shape, out.type = old.shape, old.type
    replaced = list(node.inputs[1:])
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old], [out])
    drop_if_unused(graph, replaced)


def _dense(
    node: ir.Node, x: ir.Value, weight: ir.Value, sink: list[ir.Node], label: str, suffix: str
) -> ir.Value:
    """y = x @ weight^T as the node's own op: Gemm(transB=1) or MatMul of the transpose."""
    name = f"{label}/lowrank_{suffix}"
    output = ir.Value(name=f"{name}_output_0")
    if node.op_type == "Gemm":
        created = ir.node(
            "Gemm", [x, weight], attributes={"transB": 1}, name=name, outputs=[output]
        )
    else:
        array = weight.const_value.numpy() if weight.const_value is not None else None
        assert array is not None
        weight.const_value = ir.tensor(np.ascontiguousarray(array.T), name=weight.name)
        weight.shape = ir.Shape(array.T.shape)
        created = ir.node("MatMul", [x, weight], name=name, outputs=[output])
    sink.append(created)
    return created.outputs[0]
