"""What each layer of ``lowrank`` could become: the candidate layers, their calibration
statistics, the spectra of each form, and the ranks and form a threshold on the kept energy
gives them (one threshold for the whole model under ``mac_reduction``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from detc.compiler.ir.pass_base import NoMatch
from detc.passes._graph_facts import ONNX_DOMAINS, constant_array, describe_node
from detc.passes.calibration import (
    ConvGeometry,
    collect,
    extract_patches,
    sample_positions,
    static_facts,
)
from detc.passes.lowrank.options import LowRankOptions

#: relative floor under covariance eigenvalues before whitening: a direction the data never
#: uses must not be blown up by the inverse square root
_WHITEN_FLOOR = 1e-6


@dataclass
class Layer:
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
class Plan:
    form: str
    ranks: tuple[int, ...]
    macs: int


# --- candidates -------------------------------------------------------------------------------


def candidate_layers(
    model: ir.Model, opts: LowRankOptions
) -> tuple[list[Layer], list[tuple[ir.Node, NoMatch]]]:
    geometry, macs = static_facts(model)
    layers: list[Layer] = []
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
) -> Layer | NoMatch:
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
        return Layer(
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
        layer = Layer(node, "dense", matrix * alpha, bias, macs)
    else:
        layer = Layer(node, "dense", weight.T.copy(), None, macs)
    layer.rows = macs // (layer.weight.shape[0] * layer.weight.shape[1])
    return layer


# --- statistics -------------------------------------------------------------------------------


def gather_moments(
    model: ir.Model,
    layers: Sequence[Layer],
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


def moments_covariance(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centered covariance and mean of x from the sum of [x, 1][x, 1]^T."""
    count = max(moments[-1, -1], 1.0)
    mean = moments[:-1, -1] / count
    return moments[:-1, :-1] / count - np.outer(mean, mean), mean


def sqrt_and_inverse(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    floor = _WHITEN_FLOOR * max(float(values.max()), 1e-30)
    values = np.maximum(values, floor)
    root = np.sqrt(values)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def channel_covariance(layer: Layer, vertical: bool) -> np.ndarray:
    """Covariance of one input pixel's channels (or of a kh x 1 column's), from patch moments."""
    assert layer.moments is not None
    covariance, _ = moments_covariance(layer.moments)
    channels, kh, kw = layer.weight.shape[1:]
    blocks = covariance.reshape(channels, kh, kw, channels, kh, kw)
    if vertical:  # average over the kw columns of a patch
        return np.mean([blocks[:, :, j, :, :, j] for j in range(kw)], axis=0).reshape(
            channels * kh, channels * kh
        )
    return np.mean([blocks[:, i, j, :, i, j] for i in range(kh) for j in range(kw)], axis=0)


# --- spectra, ranks, MACs ----------------------------------------------------------------------


def _spectra(layer: Layer, form: str) -> tuple[np.ndarray, ...]:
    """Energies (descending) whose cumulative share picks each rank of ``form``."""
    if form in layer.spectra:
        return layer.spectra[form]
    weight = layer.weight.astype(np.float64)
    data = layer.moments is not None
    if form == "svd":
        matrix = layer.matrix
        if data:
            covariance, _ = moments_covariance(layer.moments)  # type: ignore[arg-type]
            result: tuple[np.ndarray, ...] = (_output_energies(matrix, covariance),)
        else:
            result = (np.linalg.svd(matrix, compute_uv=False) ** 2,)
    elif form == "tucker2":
        n, c = weight.shape[:2]
        out_unfold = weight.reshape(n, -1)
        in_unfold = weight.transpose(1, 0, 2, 3).reshape(c, -1)
        if data:
            covariance, _ = moments_covariance(layer.moments)  # type: ignore[arg-type]
            root, _ = sqrt_and_inverse(channel_covariance(layer, vertical=False))
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
        matrix = spatial_matrix(weight)
        if data:
            root, _ = sqrt_and_inverse(channel_covariance(layer, vertical=True))
            matrix = root @ matrix
        result = (np.linalg.svd(matrix, compute_uv=False) ** 2,)
    layer.spectra[form] = result
    return result


def _output_energies(matrix: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    values = np.linalg.eigvalsh(matrix @ covariance @ matrix.T)
    return np.maximum(values[::-1], 0.0)


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
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


def _plan_macs(layer: Layer, form: str, ranks: tuple[int, ...]) -> int:
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


def _forms_for(layer: Layer, opts: LowRankOptions) -> list[str]:
    if layer.is_pointwise:
        return ["svd"]
    return [f for f in ("tucker2", "spatial") if f in opts.form_list]


def best_plan(layer: Layer, threshold: float, opts: LowRankOptions) -> Plan | NoMatch:
    plans = []
    for form in _forms_for(layer, opts):
        ranks = tuple(_rank_for(e, threshold, opts.multiple) for e in _spectra(layer, form))
        plans.append(Plan(form, ranks, _plan_macs(layer, form, ranks)))
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


def energy_threshold(layers: Sequence[Layer], opts: LowRankOptions) -> float:
    """The highest energy threshold whose factorizations remove ``mac_reduction`` of MACs."""
    assert opts.mac_reduction is not None
    total = sum(layer.macs for layer in layers)

    def saved(threshold: float) -> int:
        result = 0
        for layer in layers:
            plan = best_plan(layer, threshold, opts)
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
