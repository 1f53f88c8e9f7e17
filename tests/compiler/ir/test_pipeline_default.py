"""The default pipeline on a torch Conv+BN+SiLU network exported un-fused, and --verify-each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from detc.compiler import (
    DEFAULT_PIPELINE,
    DetcPass,
    PassResult,
    VerificationMismatchError,
    parse_pipeline,
    run_pipeline,
)
from detc.compiler.ir import registry as _registry
from detc.compiler.tolerances import FP32_EXACT
from tests._models import (
    assert_outputs_close,
    conv_bn_silu_torch_export,
    op_types,
    random_inputs,
    run_ort,
)

pytest.importorskip("torch")

FOLD_BN = "fold-constants,fold-conv-bn,eliminate-dead-code"
#: what is left of four Conv+BN+SiLU blocks and the residual Add once BN is folded
FOLDED_OPS = ["Conv", "Sigmoid", "Mul"] * 3 + ["Add"] + ["Conv", "Sigmoid", "Mul"]


@pytest.fixture(scope="module", params=[True, False], ids=["dynamo", "torchscript"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conv_bn_silu_torch_export(tmp_path_factory.mktemp("export"), dynamo=request.param)


@pytest.mark.parametrize("pipeline", [FOLD_BN, DEFAULT_PIPELINE])
def test_pipeline_folds_every_batchnorm_and_keeps_outputs(exported: Path, pipeline: str) -> None:
    model = ir.load(exported)
    assert op_types(model).count("BatchNormalization") == 4
    feeds = random_inputs(model, np.random.default_rng(0))
    expected = run_ort(model, feeds)

    run = run_pipeline(model, parse_pipeline(pipeline))

    assert [r.step for r in run.records] == pipeline.split(",")
    assert next(r for r in run.records if r.step == "fold-conv-bn").modified
    assert op_types(run.model) == FOLDED_OPS
    assert [v.name for v in run.model.graph.outputs] == ["y"]
    assert_outputs_close(run_ort(run.model, feeds), expected, FP32_EXACT)


def test_verify_each_records_drift_within_tolerance(exported: Path) -> None:
    run = run_pipeline(ir.load(exported), parse_pipeline(DEFAULT_PIPELINE), verify_each=True)

    checked = [r for r in run.records if r.modified]
    assert any(r.step == "fold-conv-bn" for r in checked)
    for record in checked:
        assert record.drift and all(d.within_tolerance for d in record.drift), record.step
    assert all(r.drift is None for r in run.records if not r.modified)


@dataclass(frozen=True)
class _Budget:
    factor: float = 1.01


class _ScaleFirstConvWeight(DetcPass):
    """Scale the first Conv's weight: a deliberately wrong rewrite."""

    name = "scale-first-conv"
    exact = True
    Options = _Budget

    def call(self, model: ir.Model) -> PassResult:
        conv = next(n for n in model.graph if n.op_type == "Conv")
        weight = conv.inputs[1]
        assert weight is not None and weight.const_value is not None
        weight.const_value = ir.tensor(weight.const_value.numpy() * self.options.factor)
        return PassResult(model, True)


class _ApproximateScale(_ScaleFirstConvWeight):
    """The same rewrite, declared approximate: its drift is recorded, not refused."""

    name = "approximate-scale"
    exact = False


@pytest.fixture
def broken_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _registry._registry()
    for cls in (_ScaleFirstConvWeight, _ApproximateScale):
        cls.validate_declaration()
        monkeypatch.setitem(registry, cls.name, cls)


@pytest.mark.usefixtures("broken_passes")
def test_verify_each_names_the_first_exact_pass_that_drifts(exported: Path) -> None:
    pipeline = parse_pipeline("fold-constants,fold-conv-bn,scale-first-conv,eliminate-dead-code")

    with pytest.raises(VerificationMismatchError, match=r"pass 'scale-first-conv' \(step 3\)"):
        run_pipeline(ir.load(exported), pipeline, verify_each=True)


@pytest.mark.usefixtures("broken_passes")
def test_verify_each_records_an_approximate_pass_drift(exported: Path) -> None:
    pipeline = parse_pipeline("fold-conv-bn,approximate-scale{factor=1.5},eliminate-dead-code")

    run = run_pipeline(ir.load(exported), pipeline, verify_each=True)

    record = run.records[1]
    assert record.step == "approximate-scale{factor=1.5}" and not record.exact
    assert record.drift and not all(d.within_tolerance for d in record.drift)
    assert run.records[2].step == "eliminate-dead-code"  # the run went on


@pytest.mark.usefixtures("broken_passes")
def test_without_verify_each_the_broken_pass_goes_unnoticed(exported: Path) -> None:
    """The control: the mismatch above comes from --verify-each, not from the pass crashing."""
    run = run_pipeline(ir.load(exported), parse_pipeline("fold-conv-bn,scale-first-conv"))
    assert [r.drift for r in run.records] == [None, None]
