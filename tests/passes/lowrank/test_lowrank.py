"""lowrank: full rank is exact, low-rank weights factor exactly, data-aware beats weights-only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from PIL import Image

from detc.compiler.ir.stats import graph_stats
from detc.compiler.tolerances import FP32_EXACT, Tolerance
from detc.passes.calibration import calibration_feeds
from detc.passes.lowrank.core import LowRankOptions, LowRankPass
from tests._models import (
    assert_outputs_close,
    explain_reasons,
    make_model,
    op_types,
    random_inputs,
    run_ort,
    value_info,
)

SIZE = 8
FORCE = dict(energy=1.0, min_saving=-100.0, multiple=1)  # factorize at full rank, cost or not


def conv_model(
    rng: np.random.Generator,
    *,
    kernel: int = 3,
    stride: int = 1,
    dilation: int = 1,
    weight: np.ndarray | None = None,
    group: int = 1,
    hidden: int = 16,
    out: int = 24,
) -> ir.Model:
    """x (3 ch) -> 'p' 1x1 Conv to ``hidden`` -> Relu -> 'q' (the candidate) -> Identity -> y."""
    pad = dilation * (kernel // 2)
    q_weight = (
        weight
        if weight is not None
        else rng.normal(0, 0.3, (out, hidden // group, kernel, kernel)).astype(np.float32)
    )
    inits = {
        "p_w": rng.normal(0, 0.5, (hidden, 3, 1, 1)).astype(np.float32),
        "p_b": np.asarray(rng.normal(0, 0.5, hidden), np.float32),
        "q_w": q_weight,
        "q_b": np.asarray(rng.normal(0, 0.5, q_weight.shape[0]), np.float32),
    }
    out_size = (SIZE + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    nodes = [
        helper.make_node("Conv", ["x", "p_w", "p_b"], ["p"], name="p"),
        helper.make_node("Relu", ["p"], ["p_act"], name="p_relu"),
        helper.make_node(
            "Conv",
            ["p_act", "q_w", "q_b"],
            ["q"],
            name="q",
            strides=[stride, stride],
            pads=[pad] * 4,
            dilations=[dilation, dilation],
            group=group,
        ),
        helper.make_node("Identity", ["q"], ["y"], name="out"),
    ]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, 3, SIZE, SIZE])],
        [value_info("y", np.float32, [1, q_weight.shape[0], out_size, out_size])],
        inits,
    )


def dense_model(rng: np.random.Generator, op: str, trans_b: int = 0) -> ir.Model:
    """x (4, 2, 20) or (4, 20) -> Gemm / MatMul with a constant weight to 12 outputs -> y."""
    weight = rng.normal(0, 0.3, (12, 20) if trans_b else (20, 12)).astype(np.float32)
    inits = {"w": weight, "c": rng.normal(0, 0.5, 12).astype(np.float32)}
    if op == "Gemm":
        node = helper.make_node(
            "Gemm", ["x", "w", "c"], ["y"], name="dense", transB=trans_b, alpha=0.7, beta=1.3
        )
        shape_in, shape_out = [4, 20], [4, 12]
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="dense")
        shape_in, shape_out = [4, 2, 20], [4, 2, 12]
    return make_model(
        [node],
        [value_info("x", np.float32, shape_in)],
        [value_info("y", np.float32, shape_out)],
        inits,
    )


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(6):
        pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def _run(model: ir.Model, **options) -> LowRankPass:
    pass_ = LowRankPass(LowRankOptions(**options))
    pass_(model)
    return pass_


def _check_exact(model: ir.Model, rng: np.random.Generator, tolerance=FP32_EXACT, **options):
    feeds = random_inputs(model, rng)
    if "calib" in options:  # data-aware factors are exact on what the data spans: its images
        feeds = calibration_feeds(model, options["calib"], max_images=1, seed=5)[0]
    expected = run_ort(model, feeds)
    pass_ = _run(model, **options)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert_outputs_close(run_ort(model, feeds), expected, tolerance)
    return pass_


@pytest.mark.parametrize(
    "form, kernel, stride, dilation, convs",
    [
        ("svd", 1, 1, 1, 4),
        ("svd", 1, 2, 1, 4),
        ("tucker2", 3, 1, 1, 4),
        ("tucker2", 3, 2, 1, 4),
        ("tucker2", 3, 1, 2, 4),
        ("spatial", 3, 1, 1, 3),
        ("spatial", 5, 2, 1, 3),
        ("spatial", 3, 1, 2, 3),
    ],
)
def test_full_rank_reproduces_the_conv(
    rng: np.random.Generator, form: str, kernel: int, stride: int, dilation: int, convs: int
) -> None:
    model = conv_model(rng, kernel=kernel, stride=stride, dilation=dilation)
    pass_ = _check_exact(model, rng, forms=form, **FORCE)
    assert op_types(model).count("Conv") == convs  # 1x1 'p' is factorized only by svd
    assert pass_.report is not None
    decided = {d.name: d.form for d in pass_.report.layers}
    assert decided["q"] == form
    # every factor's output is named after the layer it replaces (profiles show the layer)
    factor_nodes = [node for node in model.graph if "lowrank" in (node.name or "")]
    factor_outputs = [value.name for node in factor_nodes for value in node.outputs]
    replaced_outputs = {"p", "q"}  # the last factor takes over the layer's own output
    assert factor_outputs and all(
        name in replaced_outputs or (name or "").startswith(("p/lowrank_", "q/lowrank_"))
        for name in factor_outputs
    )


@pytest.mark.parametrize("op, trans_b", [("Gemm", 0), ("Gemm", 1), ("MatMul", 0)])
def test_full_rank_reproduces_the_dense_layer(
    rng: np.random.Generator, op: str, trans_b: int
) -> None:
    model = dense_model(rng, op, trans_b)
    _check_exact(model, rng, **FORCE)
    assert op_types(model).count(op) == 2


def test_full_rank_data_aware_factors_are_exact(rng: np.random.Generator, calib_dir: Path) -> None:
    for form, kernel in [("svd", 1), ("tucker2", 3), ("spatial", 3)]:
        model = conv_model(rng, kernel=kernel)
        pass_ = _check_exact(
            model, rng, Tolerance(rtol=1e-2, atol=1e-3), forms=form, calib=calib_dir, **FORCE
        )
        assert pass_.report is not None and pass_.report.calib_images == 6
        errors = [d.error for d in pass_.report.layers if d.form]
        assert errors and all(e is not None and e < 1e-6 for e in errors), errors


def test_a_low_rank_weight_factors_exactly_and_cuts_macs(rng: np.random.Generator) -> None:
    # separable in height and width through 4 channels: a 3x1 Conv to 4, then a 1x3 Conv
    rank_4 = np.einsum("rci,nrj->ncij", rng.normal(size=(4, 16, 3)), rng.normal(size=(24, 4, 3)))
    model = conv_model(rng, weight=(0.1 * rank_4).astype(np.float32))
    before = graph_stats(model).macs
    pass_ = _check_exact(
        model, rng, Tolerance(rtol=1e-4, atol=1e-4), energy=0.9999, multiple=4, forms="spatial"
    )
    assert pass_.report is not None
    decision = next(d for d in pass_.report.layers if d.name == "q")
    assert (decision.form, decision.ranks) == ("spatial", (4,))
    after = graph_stats(model).macs
    assert after < before and pass_.report.macs_after == after


def test_data_aware_keeps_the_subspace_the_data_uses(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    """q reads 16 channels that are affine in 3 colours: rank 4 loses nothing on real inputs."""
    template = ir.serde.serialize_model(conv_model(rng, kernel=1, hidden=16, out=16))
    linear = ir.serde.deserialize_model(template)
    relu = next(n for n in linear.graph if n.op_type == "Relu")
    relu.op_type = "Identity"  # make p's output exactly affine in the input colours
    template = ir.serde.serialize_model(linear)
    feeds = {"x": np.random.default_rng(1).uniform(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)}
    expected = run_ort(template, feeds)

    aware = ir.serde.deserialize_model(template)
    pass_ = _run(aware, energy=0.999, multiple=4, calib=calib_dir)
    assert pass_.report is not None
    assert [(d.name, d.form, d.ranks) for d in pass_.report.layers if d.form] == [
        ("q", "svd", (4,))
    ]
    assert_outputs_close(run_ort(aware, feeds), expected, Tolerance(rtol=1e-3, atol=1e-3))

    blind = ir.serde.deserialize_model(template)
    reasons = explain_reasons(LowRankPass(LowRankOptions(energy=0.999, multiple=4)), blind)
    assert "keeps 200 % of its MACs" in reasons["q"]  # weights alone need all 16 ranks
    _run(blind, energy=0.3, multiple=4)  # forced down to rank 4 without data: far off
    actual = run_ort(blind, feeds)["y"]
    relative = np.linalg.norm(actual - expected["y"]) / np.linalg.norm(expected["y"])
    assert relative > 0.05


def test_mac_reduction_target_is_met_and_reproducible(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    template = ir.serde.serialize_model(conv_model(rng, kernel=3, hidden=32, out=32))
    before = graph_stats(ir.serde.deserialize_model(template)).macs
    results = []
    for _ in range(2):
        model = ir.serde.deserialize_model(template)
        pass_ = _run(model, mac_reduction=0.4, multiple=4, calib=calib_dir)
        assert pass_.report is not None
        assert 1 - graph_stats(model).macs / before >= 0.4
        results.append(ir.serde.serialize_model(model))
    first, second = (
        {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        for proto in results
    )
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_does_not_fire_without_a_clear_saving_or_on_grouped_and_runtime_weights(
    rng: np.random.Generator,
) -> None:
    model = conv_model(rng, kernel=1, hidden=16, out=16)
    reasons = explain_reasons(LowRankPass(LowRankOptions(energy=1.0)), model)
    assert reasons["q"] == (
        "Conv 'q': best form svd (ranks 16) keeps 200 % of its MACs; min_saving=0.4 needs at "
        "most 60 %"
    )
    grouped = conv_model(rng, group=4)
    assert explain_reasons(LowRankPass(), grouped)["q"] == (
        "Conv 'q' is a grouped Conv (only group=1 is factorized)"
    )
    runtime = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [value_info("x", np.float32, [1, 3, 4, 4]), value_info("w", np.float32, [8, 3, 1, 1])],
        [value_info("y", np.float32, [1, 8, 4, 4])],
    )
    assert explain_reasons(LowRankPass(), runtime)["conv"] == (
        "Conv 'conv' has no constant float weight"
    )
    before = op_types(model)
    assert LowRankPass(LowRankOptions(energy=1.0))(model).modified is False
    assert op_types(model) == before
