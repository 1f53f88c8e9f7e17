"""prune: structure, numbers against onnxruntime, importance, recovery, where it must not cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from PIL import Image

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pass_base import parse_options
from detc.compiler.ir.stats import graph_stats
from detc.compiler.tolerances import FP32_EXACT, Tolerance
from detc.passes.prune.core import PruneOptions, PrunePass
from detc.passes.prune.groups import analyze_channels
from detc.passes.prune.reconstruct import DEFAULT_RIDGE, RIDGE_GRID
from tests._models import (
    assert_outputs_close,
    constant,
    explain_reasons,
    make_model,
    random_inputs,
    run_ort,
    value_info,
)
from tests.passes.prune.test_groups import _conv, _silu, head_model

SIZE = 16


def detector(rng: np.random.Generator, *, duplicate: bool = False) -> ir.Model:
    """A small detector: residual block, a side branch concatenated, a head with a fixed layout.

    a (3->8, 3x3) -> SiLU -> [b (8->8, 3x3) -> SiLU] + residual ; d (3->8) -> ReLU ;
    concat -> c (16->8) -> SiLU -> head (8->6) -> Reshape (1, 2, 3, H*W).
    ``duplicate`` makes filter 7 of ``d`` a copy of filter 2: one of them is redundant.
    """
    inits: dict[str, np.ndarray] = {"shape": np.array([1, 2, 3, SIZE * SIZE], np.int64)}
    nodes = [_conv(rng, inits, "a", "x", 3, 8, kernel=3), *_silu("a", "a_act")]
    nodes += [_conv(rng, inits, "b", "a_act", 8, 8, kernel=3), *_silu("b", "b_act")]
    nodes += [helper.make_node("Add", ["a_act", "b_act"], ["sum"], name="add")]
    nodes += [_conv(rng, inits, "d", "x", 3, 8)]
    if duplicate:
        inits["d_w"][7] = inits["d_w"][2]
        inits["d_b"][7] = inits["d_b"][2]
    nodes += [helper.make_node("Relu", ["d"], ["d_act"], name="d_relu")]
    nodes += [helper.make_node("Concat", ["sum", "d_act"], ["cat"], name="cat", axis=1)]
    nodes += [_conv(rng, inits, "c", "cat", 16, 8), *_silu("c", "c_act")]
    nodes += [_conv(rng, inits, "head", "c_act", 8, 6)]
    nodes += [helper.make_node("Reshape", ["head", "shape"], ["y"], name="layout")]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, 3, SIZE, SIZE])],
        [value_info("y", np.float32, [1, 2, 3, SIZE * SIZE])],
        inits,
    )


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    """Eight small seeded images (smooth gradients plus noise, like a photo more than static)."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "calib"
    folder.mkdir()
    ramp = np.linspace(0, 1, 24)
    for i in range(8):
        base = rng.uniform(0, 255, 3) * np.add.outer(ramp, ramp[::-1])[..., None] / 2
        pixels = np.clip(base + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def _prune(model: ir.Model, **options) -> PrunePass:
    pass_ = PrunePass(PruneOptions(**options))
    pass_(model)
    return pass_


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {str(n.name): constant(n.inputs[1]) for n in model.graph if n.op_type == "Conv"}


def test_ratio_zero_reproduces_the_model(rng: np.random.Generator) -> None:
    model = detector(rng)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    result = PrunePass(PruneOptions(ratio=0.0, multiple=2))(model)

    assert result.modified is False
    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_graph_keeps_outputs_and_cuts_macs(rng: np.random.Generator, scope: str) -> None:
    model = detector(rng)
    before = graph_stats(model)
    outputs = [(v.name, str(v.shape)) for v in model.graph.outputs]

    pass_ = _prune(model, ratio=0.5, multiple=2, scope=scope)

    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert [(v.name, str(v.shape)) for v in model.graph.outputs] == outputs
    after = graph_stats(model)
    assert pass_.report is not None
    assert after.macs < before.macs and after.parameters < before.parameters
    assert pass_.report.macs_after == after.macs
    feeds = random_inputs(model, rng)
    assert run_ort(model, feeds)["y"].shape == (1, 2, 3, SIZE * SIZE)
    weights = _weights(model)
    assert weights["head"].shape[0] == 6  # the head's layout is never cut
    assert weights["a"].shape[0] == weights["b"].shape[0] == weights["b"].shape[1]  # coupled


def test_layer_scope_rounds_to_the_multiple(rng: np.random.Generator) -> None:
    model = detector(rng)
    _prune(model, ratio=0.3, multiple=4, scope="layer")
    weights = _weights(model)
    assert {name: w.shape[0] for name, w in weights.items()} == {
        "a": 4,  # 8 * 0.7 = 5.6 -> 4 (nearest multiple of 4)
        "b": 4,
        "d": 4,
        "c": 4,
        "head": 6,
    }


def test_mac_reduction_target_is_met(rng: np.random.Generator) -> None:
    model = detector(rng)
    before = graph_stats(model).macs
    pass_ = _prune(model, mac_reduction=0.3, multiple=2)
    assert pass_.report is not None
    assert 1 - graph_stats(model).macs / before >= 0.3
    assert pass_.report.mac_reduction >= 0.3


def test_explain_says_why_groups_are_kept(rng: np.random.Generator) -> None:
    reasons = explain_reasons(PrunePass(), head_model(rng))
    assert reasons["head"] == (
        "group 1 (6 channels of Conv 'head') is kept: "
        "feeds Reshape 'layout', whose channel layout is unknown"
    )
    assert reasons["a"] == "group 0 (8 channels of Conv 'a') has no more than multiple=16 channels"
    assert explain_reasons(PrunePass(PruneOptions(multiple=4)), head_model(rng))["a"] == ""


@pytest.mark.parametrize("importance", ["l1", "l2", "bn"])
def test_norm_importance_removes_the_weakest_filter(
    rng: np.random.Generator, importance: str
) -> None:
    model = detector(rng)
    conv_d = next(n for n in model.graph if n.name == "d")
    weight = constant(conv_d.inputs[1]).copy()
    weight[5] *= 1e-3  # with BN folded, the filter norm *is* the BN scale: bn falls back to it
    conv_d.inputs[1].const_value = ir.tensor(weight, name=conv_d.inputs[1].name)  # type: ignore[union-attr]
    original = weight.reshape(8, -1)

    _prune(model, ratio=0.125, multiple=1, scope="layer", importance=importance)

    kept = _weights(model)["d"].reshape(7, -1)
    remaining = [int(np.argmin(np.abs(original - row).sum(axis=1))) for row in kept]
    assert remaining == [0, 1, 2, 3, 4, 6, 7]


@pytest.mark.parametrize("allocation", ["consumers", "outputs"])
def test_lsq_removes_the_redundant_channel_and_recovery_absorbs_it(
    rng: np.random.Generator, calib_dir: Path, allocation: str
) -> None:
    model = detector(rng, duplicate=True)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    pass_ = _prune(
        model, ratio=0.04, multiple=1, calib=calib_dir, calib_images=8, allocation=allocation
    )  # 1 of 24

    assert pass_.report is not None
    assert [(g.name, g.kept) for g in pass_.report.groups if g.kept < g.channels] == [("d", 7)]
    # channel 2 and its copy 7 are the same feature: whichever stays carries both
    assert_outputs_close(run_ort(model, feeds), expected, Tolerance(rtol=1e-3, atol=1e-3))


@pytest.mark.parametrize("sequential", [True, False])
def test_recovery_reduces_error_and_is_reproducible(
    rng: np.random.Generator, calib_dir: Path, sequential: bool
) -> None:
    template = ir.serde.serialize_model(detector(rng))
    options = dict(ratio=0.4, multiple=2, calib=calib_dir, calib_images=6, sequential=sequential)
    first = ir.serde.deserialize_model(template)
    second = ir.serde.deserialize_model(template)
    report = _prune(first, **options).report
    _prune(second, **options)

    assert report is not None and report.fits
    assert report.output_error_before is not None and report.output_error_after is not None
    assert report.output_error_after < report.output_error_before
    for fit in report.fits:
        assert fit.error_after <= fit.error_before, fit
    weights_first, weights_second = _weights(first), _weights(second)
    for name, weight in weights_first.items():
        np.testing.assert_array_equal(weight, weights_second[name], err_msg=name)


def test_distillation_after_the_refit_brings_outputs_closer(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    pytest.importorskip("torch")
    template = ir.serde.serialize_model(detector(rng))
    options = dict(ratio=0.4, multiple=2, calib=calib_dir, calib_images=6)
    refit_only = _prune(ir.serde.deserialize_model(template), **options).report
    distilled = _prune(
        ir.serde.deserialize_model(template),
        **options,
        distill_steps=30,
        distill_size=16,
        distill_batch=2,
        distill_lr=3e-3,
    ).report
    assert refit_only is not None and distilled is not None and distilled.distill is not None
    assert distilled.recovery == "least squares, sequential + distillation"
    assert distilled.distill.kept and distilled.distill.loss_after < distilled.distill.loss_before
    assert refit_only.output_error_after is not None and distilled.output_error_after is not None
    assert distilled.output_error_after < refit_only.output_error_after
    assert "distillation: 30 steps" in distilled.table()


def test_without_recovery_the_weights_are_only_sliced(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model = detector(rng)
    original = _weights(model)
    biases = {n.name: constant(n.inputs[2]) for n in model.graph if n.op_type == "Conv"}
    pass_ = _prune(
        model,
        ratio=0.4,
        multiple=2,
        calib=calib_dir,
        calib_images=4,
        recover=False,
        mean_shift=False,
    )
    assert pass_.report is not None and not pass_.report.fits
    assert pass_.report.recovery == "none"
    for node in model.graph:  # no bias moved: each is a slice of the original
        if node.op_type == "Conv":
            assert np.isin(constant(node.inputs[2]), biases[node.name]).all(), node.name
    cg = analyze_channels(detector(np.random.default_rng(0)).graph)
    assert cg.groups  # the weights left are rows/columns of the originals, untouched
    for name, weight in _weights(model).items():
        rows = original[name].reshape(original[name].shape[0], -1)
        for row in weight.reshape(weight.shape[0], weight.shape[1], -1):
            assert any(np.isin(row.ravel(), r).all() for r in rows), name


@pytest.mark.parametrize(
    "text, message",
    [
        ([("scope", "everywhere")], "scope='everywhere' must be one of layer, global"),
        ([("importance", "data")], "importance=data needs calib=DIR"),
        ([("ratio", "1.5")], "ratio=1.5 must be in [0, 1)"),
        ([("ridge", "-1")], "ridge=-1.0 must not be negative"),
        ([("distill_steps", "5")], "distill_steps needs calib=DIR"),
    ],
)
def test_options_are_checked(text: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(BadInputError) as caught:
        parse_options(PrunePass, text)
    assert str(caught.value).startswith(f"pass 'prune': {message}")


def test_sweep_measures_macs_latency_and_plots(rng: np.random.Generator, tmp_path: Path) -> None:
    from detc.compiler.sweep import sweep

    path = tmp_path / "detector.onnx"
    onnx.save(ir.serde.serialize_model(detector(rng)), path)
    result = sweep(
        path,
        "prune",
        [0.25, 0.5],
        option="ratio",
        pass_options="multiple=2,scope=layer",
        save_dir=tmp_path / "models",
        runs=2,
        warmup=1,
        threads=1,
        plot=tmp_path / "sweep.png",
        progress=False,
    )
    assert result.option == "ratio"
    assert [p.pipeline for p in result.points] == [
        f"default,prune{{ratio={v},multiple=2,scope=layer}}" for v in (0.25, 0.5)
    ]
    reductions = [p.mac_reduction for p in result.points]
    assert 0 < reductions[0] < reductions[1]
    assert all(p.latency_ms > 0 and p.base_latency_ms > 0 and p.map is None for p in result.points)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratio" in result.table()
    saved = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert saved == ["ratio-0.25.onnx", "ratio-0.5.onnx"]


def test_mean_shift_moves_the_cut_channels_mean_into_the_biases(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model = detector(rng)
    original = _weights(model)
    pass_ = _prune(model, ratio=0.4, multiple=2, calib=calib_dir, calib_images=6, recover=False)

    report = pass_.report
    assert report is not None and report.recovery == "mean shift" and not report.fits
    assert report.output_error_before is not None and report.output_error_after is not None
    assert report.output_error_after < report.output_error_before
    # only biases moved: the weights are rows/columns of the originals
    for name, weight in _weights(model).items():
        rows = original[name].reshape(original[name].shape[0], -1)
        for row in weight.reshape(weight.shape[0], weight.shape[1], -1):
            assert any(np.isin(row.ravel(), r).all() for r in rows), name


def test_mean_shift_needs_calibration_images(rng: np.random.Generator) -> None:
    model = detector(rng)
    biases = {n.name: constant(n.inputs[2]) for n in model.graph if n.op_type == "Conv"}
    pass_ = _prune(model, ratio=0.4, multiple=2, recover=False)  # no calib: nothing to average
    assert pass_.report is not None and pass_.report.recovery == "none"
    for node in model.graph:
        if node.op_type == "Conv":
            assert np.isin(constant(node.inputs[2]), biases[node.name]).all(), node.name


def test_outputs_allocation_measures_every_group_on_the_outputs(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model = detector(rng)
    pass_ = _prune(model, ratio=0.25, multiple=2, calib=calib_dir, calib_images=6)

    report = pass_.report
    assert report is not None and report.allocation == "outputs"
    # the toy's outputs decode to no detections: its head Convs' outputs are compared instead
    assert report.probe_metric == "relative squared error of the head Convs' outputs"
    probed = {p.name for p in report.probes}
    assert probed == {"a", "d", "c"}  # every candidate group, the frozen head excepted
    for name in probed:
        depths = [p for p in report.probes if p.name == name]
        assert [p.units for p in depths] == sorted(p.units for p in depths)
        assert all(p.distortion >= 0 and p.macs_saved > 0 for p in depths)
        assert depths[-1].distortion > 0  # (a ReLU channel dead on every image costs nothing)


@pytest.mark.parametrize(
    "options",
    [dict(allocation="consumers"), dict(scope="layer")],
    ids=["consumers", "layer-scope"],
)
def test_no_trial_cuts_unless_outputs_allocation(
    rng: np.random.Generator, calib_dir: Path, options: dict
) -> None:
    model = detector(rng)
    pass_ = _prune(model, ratio=0.25, multiple=2, calib=calib_dir, calib_images=4, **options)
    assert pass_.report is not None and not pass_.report.probes
    assert pass_.report.probe_metric is None


def yolo_like(rng: np.random.Generator) -> ir.Model:
    """A toy with a YOLOv5 output, (1, 64, 6): cx, cy, w, h in pixels, objectness, one class.

    a (3->8, 3x3) -> SiLU -> b (8->8) -> SiLU -> head (8->6) -> (1, 64, 6) -> sigmoid x scale.
    The head's objectness and class logits are biased up so that boxes are confident.
    """
    inits: dict[str, np.ndarray] = {
        "shape": np.array([1, 6, 64], np.int64),
        "scale": np.array([8, 8, 8, 8, 1, 1], np.float32),
    }
    nodes = [_conv(rng, inits, "a", "x", 3, 8, kernel=3), *_silu("a", "a_act")]
    nodes += [_conv(rng, inits, "b", "a_act", 8, 8), *_silu("b", "b_act")]
    nodes += [_conv(rng, inits, "head", "b_act", 8, 6)]
    inits["head_b"][4:] += 3.0
    nodes += [
        helper.make_node("Reshape", ["head", "shape"], ["rows"], name="rows"),
        helper.make_node("Transpose", ["rows"], ["boxes"], name="boxes", perm=[0, 2, 1]),
        helper.make_node("Sigmoid", ["boxes"], ["unit"], name="unit"),
        helper.make_node("Mul", ["unit", "scale"], ["y"], name="pixels"),
    ]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, 3, 8, 8])],
        [value_info("y", np.float32, [1, 64, 6])],
        inits,
    )


def _yolo_probe(rng: np.random.Generator, calib_dir: Path, metric: str) -> tuple[ir.Model, Any]:
    """A YOLO-like model and the output probe of allocation=outputs on four calibration images."""
    from detc.passes.calibration import calibration_feeds
    from detc.passes.prune.probe import OutputProbe

    model = yolo_like(rng)
    feeds = calibration_feeds(model, calib_dir, max_images=4)
    return model, OutputProbe(model, analyze_channels(model.graph), feeds, None, metric)


def test_probe_scores_detections_against_the_originals(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model, probe = _yolo_probe(rng, calib_dir, "detections")
    assert probe.metric == "1 - mAP@[.5:.95] against the original's detections"
    assert probe.distortion({}) == 0.0  # the original agrees with itself

    head = next(n for n in model.graph if n.name == "head")
    weight, bias = constant(head.inputs[1]), constant(head.inputs[2])
    nudged = probe.distortion({head: (weight * 1.01, bias)})
    broken = probe.distortion({head: (weight * 3.0, bias)})
    assert 0.0 < nudged < broken <= 1.0


@pytest.mark.parametrize("downstream", [False, True])
def test_sequential_refit_reaches_uncut_convs_only_when_asked(
    rng: np.random.Generator, calib_dir: Path, downstream: bool
) -> None:
    model = detector(rng, duplicate=True)
    pass_ = _prune(
        model,
        ratio=0.04,  # one channel of d: only c reads it; head reads c, which keeps its channels
        multiple=1,
        calib=calib_dir,
        calib_images=8,
        allocation="consumers",
        downstream=downstream,
    )
    assert pass_.report is not None
    assert [f.name for f in pass_.report.fits] == (["c", "head"] if downstream else ["c"])


def test_recovery_chooses_a_ridge_per_conv_on_held_back_images(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    template = ir.serde.serialize_model(detector(rng))
    options = dict(ratio=0.4, multiple=2, calib=calib_dir, calib_images=8)
    first = ir.serde.deserialize_model(template)
    second = ir.serde.deserialize_model(template)
    report = _prune(first, **options).report
    _prune(second, **options)

    assert report is not None and report.fits
    assert report.calib_images == 8
    assert all(fit.ridge in RIDGE_GRID for fit in report.fits)
    assert report.output_error_after is not None and report.output_error_before is not None
    assert report.output_error_after < report.output_error_before
    for name, weight in _weights(first).items():
        np.testing.assert_array_equal(weight, _weights(second)[name], err_msg=name)


def test_a_fixed_ridge_is_used_as_given(rng: np.random.Generator, calib_dir: Path) -> None:
    model = detector(rng)
    report = _prune(model, ratio=0.4, multiple=2, calib=calib_dir, calib_images=8, ridge=0.5).report

    assert report is not None and report.fits
    assert {fit.ridge for fit in report.fits} <= {0.5, np.inf}


def test_with_too_few_images_to_hold_back_the_ridge_is_the_default(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model = detector(rng)
    report = _prune(model, ratio=0.4, multiple=2, calib=calib_dir, calib_images=3).report

    assert report is not None and report.fits
    assert {fit.ridge for fit in report.fits} <= {DEFAULT_RIDGE, np.inf}


def test_sweep_cli_passes_calib_to_the_pass(
    rng: np.random.Generator, tmp_path: Path, calib_dir: Path
) -> None:
    import json
    import subprocess
    import sys

    path = tmp_path / "detector.onnx"
    onnx.save(ir.serde.serialize_model(detector(rng)), path)
    command = [sys.executable, "-m", "detc.compiler.cli", "sweep", str(path), "--pass", "prune"]
    command += ["--values", "0.25", "--options", "multiple=2", "--calib", str(calib_dir)]
    result = subprocess.run(
        [*command, "--runs", "2", "--threads", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (point,) = json.loads(result.stdout)["points"]
    expected = f"default,prune{{mac_reduction=0.25,multiple=2,calib={calib_dir}}}"
    assert point["pipeline"] == expected


def test_heads_metric_is_continuous_and_zero_on_agreement(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    from detc.passes.prune.probe import HEADS_METRIC

    model, probe = _yolo_probe(rng, calib_dir, "heads")
    assert probe.metric == HEADS_METRIC
    assert probe.distortion({}) == pytest.approx(0.0, abs=1e-9)

    head = next(n for n in model.graph if n.name == "head")
    weight, bias = constant(head.inputs[1]), constant(head.inputs[2])
    tiny = probe.distortion({head: (weight * 1.001, bias)})
    nudged = probe.distortion({head: (weight * 1.01, bias)})
    broken = probe.distortion({head: (weight * 3.0, bias)})
    # a 0.1 % change, far too small to move a confident detection, still registers
    assert 0.0 < tiny < nudged < broken


def test_head_error_weighs_objectness_and_boxes_where_objects_are() -> None:
    from detc.passes.prune.probe import head_error
    from detc.passes.recover.losses import HeadLayout

    layout = HeadLayout(anchors=1, classes=1)
    reference = np.zeros((1, 6, 1, 2))
    reference[0, 4] = [4.0, -4.0]  # an object in cell 0, background in cell 1
    shifted_at_object = reference.copy()
    shifted_at_object[0, 0, 0, 0] += 1.0  # box centre moves where the object is
    shifted_at_background = reference.copy()
    shifted_at_background[0, 0, 0, 1] += 1.0  # same move where there is none

    def error(actual: np.ndarray) -> float:
        return head_error([{"h": reference}], [{"h": actual}], {"h": layout})

    assert error(reference) == pytest.approx(0.0, abs=1e-12)
    assert error(shifted_at_object) > 10 * error(shifted_at_background) > 0.0
    lost_object = reference.copy()
    lost_object[0, 4, 0, 0] = -4.0  # objectness falls below any score floor
    assert error(lost_object) > error(shifted_at_object)


@pytest.mark.parametrize(
    ("size", "max_ratio", "multiple", "fewest"),
    [
        (32, 0.3, 16, 32),
        (32, 0.5, 16, 16),
        (128, 0.3, 16, 96),
        (64, 0.25, 8, 48),
        (16, 0.9, 16, 16),
    ],
)
def test_no_group_loses_more_than_max_ratio(
    size: int, max_ratio: float, multiple: int, fewest: int
) -> None:
    from detc.passes.prune.allocation import fewest_kept

    kept = fewest_kept(size, max_ratio, multiple)
    assert kept == fewest
    assert kept % multiple == 0 or kept == size
    assert 1 - kept / size <= max_ratio + 1e-9
