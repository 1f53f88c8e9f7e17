"""Building ``lowrank``'s factors (SVD, Tucker-2, spatial SVD; the last one refit by least
squares on calibration data) and emitting them as nodes in place of the original layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import scipy.linalg

from detc.compiler.ir.pass_base import node_label
from detc.passes._graph_facts import add_initializer, drop_if_unused
from detc.passes.lowrank.plan import (
    Layer,
    Plan,
    channel_covariance,
    moments_covariance,
    spatial_matrix,
    sqrt_and_inverse,
)

_RIDGE = 1e-6


# --- building the factors ---------------------------------------------------------------------


def factorize(graph: ir.Graph, layer: Layer, plan: Plan) -> float | None:
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


def _svd_factors(layer: Layer, ranks: tuple[int, ...]) -> tuple[list[np.ndarray], FactorApply]:
    (r,) = ranks
    matrix = layer.matrix
    if layer.moments is not None:
        covariance, _ = moments_covariance(layer.moments)
        vectors = np.linalg.eigh(matrix @ covariance @ matrix.T)[1]
        basis = vectors[:, ::-1][:, :r]
        first, second = basis.T @ matrix, basis
    else:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        root = np.sqrt(s[:r])
        first, second = root[:, None] * vt[:r], u[:, :r] * root
    return [first, second], lambda f: f[1] @ f[0]


def _tucker_factors(layer: Layer, ranks: tuple[int, ...]) -> tuple[list[np.ndarray], FactorApply]:
    r1, r2 = ranks
    weight = layer.weight.astype(np.float64)
    n, c = weight.shape[:2]
    in_unfold = weight.transpose(1, 0, 2, 3).reshape(c, -1)
    out_unfold = weight.reshape(n, -1)
    if layer.moments is not None:
        covariance, _ = moments_covariance(layer.moments)
        root, inverse_root = sqrt_and_inverse(channel_covariance(layer, vertical=False))
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


def _spatial_factors(layer: Layer, ranks: tuple[int, ...]) -> tuple[list[np.ndarray], FactorApply]:
    (r,) = ranks
    weight = layer.weight.astype(np.float64)
    n, c, kh, kw = weight.shape
    matrix = spatial_matrix(weight)
    if layer.moments is not None:
        root, inverse_root = sqrt_and_inverse(channel_covariance(layer, vertical=True))
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
    layer: Layer, factors: list[np.ndarray], apply: FactorApply
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


def _feature_map(layer: Layer, factors: list[np.ndarray]) -> np.ndarray:
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


def _bias(layer: Layer) -> np.ndarray:
    return np.zeros(layer.weight.shape[0]) if layer.bias is None else layer.bias


def _relative_error(layer: Layer, approx: np.ndarray, bias: np.ndarray | None) -> float:
    """Relative squared error of the factorized layer's output over the calibration patches."""
    assert layer.moments is not None
    count = max(layer.moments[-1, -1], 1.0)
    original = np.hstack([layer.matrix, _bias(layer)[:, None]])
    new_bias = np.zeros(original.shape[0]) if bias is None else bias
    difference = original - np.hstack([approx, new_bias[:, None]])
    error = np.einsum("ij,jk,ik->", difference, layer.moments, difference, optimize=True)
    covariance, _ = moments_covariance(layer.moments)
    variance = (
        np.einsum("ij,jk,ik->", layer.matrix, covariance, layer.matrix, optimize=True) * count
    )
    return float(max(error, 0.0) / max(variance, 1e-30))


# --- emitting nodes ---------------------------------------------------------------------------


def _emit(
    graph: ir.Graph, layer: Layer, form: str, factors: list[np.ndarray], bias: np.ndarray | None
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
