"""recover: distillation from the original on unlabeled images — deterministic for a seed, a
step that makes the held-out loss worse undone and reported, the teacher from the pipeline, bad
options refused in one line (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pipeline import parse_pipeline, run_pipeline
from detc.passes.recover import RecoverOptions, RecoverPass
from tests.passes.recover._tiny import (
    damaged,
    run_recover,
    tiny_decoded_detector,
    tiny_detector,
    weights_of,
)

torch = pytest.importorskip("torch")


def test_recovery_lowers_the_held_out_loss_and_reports_each_step(
    teacher_path: Path, images: Path
) -> None:
    student = damaged(tiny_detector())
    recover = run_recover(
        student, teacher_path, images, recipe="stats+blocks+e2e", steps=20, lr=0.01
    )
    report = recover.report
    assert report is not None
    assert [s.step for s in report.steps] == ["stats", "blocks", "e2e"]
    assert report.judged_by == "head loss"  # its raw head does not decode as detections
    assert report.final.loss < report.initial.loss
    for step in report.steps:
        assert step.kept == (step.after.loss < step.before.loss)
    assert "held-out" in report.table()
    assert report.to_dict()["steps"][0]["step"] == "stats"


def test_a_detector_whose_outputs_decode_is_judged_by_its_detections(
    tmp_path: Path, images: Path
) -> None:
    teacher = tmp_path / "teacher.onnx"
    ir.save(tiny_decoded_detector(), teacher)
    student = damaged(tiny_decoded_detector(), noise=0.6)
    recover = run_recover(student, teacher, images, recipe="stats+e2e", steps=20, lr=0.01)
    report = recover.report
    assert report is not None
    assert report.judged_by == "detections"
    assert report.initial.agreement is not None and 0.0 <= report.initial.agreement < 1.0
    for step in report.steps:
        assert step.kept == step.after.better_than(step.before)
        assert step.after.agreement is not None
    assert report.final.agreement is not None
    assert report.final.agreement >= report.initial.agreement
    assert "agreement" in report.table()
    assert report.to_dict()["held_out_agreement_final"] == report.final.agreement


def test_agreement_outranks_the_head_loss_which_only_breaks_ties() -> None:
    from detc.passes.recover.held_out import Measure

    assert Measure(0.9, 0.0, 0.60).better_than(Measure(0.1, 0.0, 0.55))
    assert Measure(0.1, 0.0, 0.60).better_than(Measure(0.9, 0.0, 0.60))
    assert not Measure(0.1, 0.0, 0.50).better_than(Measure(0.9, 0.0, 0.55))
    assert Measure(0.1, 0.0).better_than(Measure(0.9, 0.0))  # no detections: the loss decides


def test_recovery_is_deterministic_for_a_seed(teacher_path: Path, images: Path) -> None:
    first, second, other_seed = (damaged(tiny_detector()) for _ in range(3))
    for model, seed in ((first, 0), (second, 0), (other_seed, 5)):
        run_recover(model, teacher_path, images, recipe="blocks+e2e", steps=6, lr=0.01, seed=seed)
    a, b, c = weights_of(first), weights_of(second), weights_of(other_seed)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert any(not np.array_equal(a[n], c[n]) for n in a)


def test_a_step_that_makes_the_held_out_loss_worse_is_undone_and_reported(
    teacher_path: Path, images: Path
) -> None:
    student = damaged(tiny_detector())
    before = weights_of(student)
    recover = run_recover(
        student, teacher_path, images, recipe="e2e", steps=4, lr=50.0, lr_scaling="none"
    )
    report = recover.report
    assert report is not None
    (step,) = report.steps
    assert not step.kept and "REJECTED" in report.table()
    assert step.after.loss >= step.before.loss
    after = weights_of(student)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_in_a_pipeline_the_teacher_is_the_model_before_the_approximate_pass(
    images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, ir.Model | None] = {}
    original_call = RecoverPass.call

    def spy(self: RecoverPass, model: ir.Model):
        seen["original"] = self.original
        return original_call(self, model)

    monkeypatch.setattr(RecoverPass, "call", spy)
    model = tiny_detector()
    weights = weights_of(model)
    pipeline = parse_pipeline(
        f"fold-constants,lowrank{{energy=0.5}},recover{{images={images},max_images=12,held_out=4,"
        "sizes=32,block_size=32,recipe=stats,threads=1}"
    )
    run_pipeline(model, pipeline)
    original = seen["original"]
    assert original is not None and original is not model
    kept = weights_of(original)
    assert all(np.array_equal(weights[n], v) for n, v in kept.items() if n in weights)


def test_without_a_teacher_recover_says_how_to_give_one(images: Path) -> None:
    with pytest.raises(BadInputError, match=r"teacher=ORIGINAL\.onnx"):
        RecoverPass(RecoverOptions(images=images))(tiny_detector())


def _detc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("images={missing},teacher={teacher}", "is not a folder"),
        ("images={images},teacher={teacher},minutes=0", "minutes=0.0 must be > 0"),
        ("images={images},teacher={teacher},recipe=stats+finetune", "recipe="),
        ("images={images},teacher={missing}", "is not a file"),
        ("images={images},teacher={teacher},labels={missing}", "not a COCO-format dataset"),
        ("images={images},teacher={teacher},label_weight=-1", "label_weight=-1.0 must be >= 0"),
        ("images={images},teacher={teacher},mosaic=2", "mosaic=2.0 must be in [0, 1]"),
    ],
)
def test_bad_options_are_one_line_errors_with_exit_2(
    options: str, message: str, images: Path, teacher_path: Path, tmp_path: Path
) -> None:
    text = options.format(images=images, teacher=teacher_path, missing=tmp_path / "nowhere")
    result = _detc(
        "opt", str(teacher_path), "-p", f"recover{{{text}}}", "-o", str(tmp_path / "o.onnx")
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_block_wise_fitting_stops_when_the_wall_clock_budget_is_spent(
    teacher_path: Path, images: Path
) -> None:
    """A block stops mid-fit at the deadline: 10^6 Adam steps per block would run for hours."""
    student = damaged(tiny_detector())
    recover = run_recover(
        student, teacher_path, images, recipe="blocks", block_steps=10**6, minutes=0.05
    )
    report = recover.report
    assert report is not None
    assert report.seconds < 60.0, report.seconds  # a 3-second budget, a minute of slack for load
