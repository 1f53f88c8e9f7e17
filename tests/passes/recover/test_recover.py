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
from onnx import helper
from PIL import Image

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pipeline import parse_pipeline, run_pipeline
from detc.passes.recover import RecoverOptions, RecoverPass
from tests._models import make_model, value_info

torch = pytest.importorskip("torch")

SIZE = 32
F32 = np.float32


def _conv(
    inits: dict, rng: np.random.Generator, name: str, src: str, cin: int, cout: int, stride: int = 1
):
    inits[f"{name}_w"] = rng.normal(0, 0.4, (cout, cin, 3, 3)).astype(F32)
    inits[f"{name}_b"] = rng.normal(0, 0.1, cout).astype(F32)
    return helper.make_node(
        "Conv",
        [src, f"{name}_w", f"{name}_b"],
        [name],
        name=name,
        pads=[1] * 4,
        strides=[stride] * 2,
    )


def tiny_detector(seed: int = 0) -> ir.Model:
    """x (1,3,32,32) -> Conv/SiLU -> Conv/SiLU -> head Conv -> Sigmoid: a YOLO-style raw head."""
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}
    nodes = [
        _conv(inits, rng, "stem", "images", 3, 8, stride=2),
        helper.make_node("Sigmoid", ["stem"], ["stem_sig"], name="stem_sig"),
        helper.make_node("Mul", ["stem", "stem_sig"], ["stem_act"], name="stem_act"),
        _conv(inits, rng, "neck", "stem_act", 8, 8),
        helper.make_node("Sigmoid", ["neck"], ["neck_sig"], name="neck_sig"),
        helper.make_node("Mul", ["neck", "neck_sig"], ["neck_act"], name="neck_act"),
        _conv(inits, rng, "head", "neck_act", 8, 6),
        helper.make_node("Sigmoid", ["head"], ["output0"], name="head_sig"),
    ]
    return make_model(
        nodes,
        [value_info("images", F32, (1, 3, SIZE, SIZE))],
        [value_info("output0", F32, (1, 6, SIZE // 2, SIZE // 2))],
        inits,
    )


def damaged(model: ir.Model, seed: int = 1, noise: float = 0.3) -> ir.Model:
    """``model`` with its Conv weights disturbed: a stand-in for what an approximate pass does."""
    rng = np.random.default_rng(seed)
    out = model.clone()
    for value in out.graph.initializers.values():
        assert value.const_value is not None
        array = value.const_value.numpy()
        value.const_value = ir.tensor(
            (array + rng.normal(0, noise * array.std(), array.shape)).astype(F32), name=value.name
        )
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    for i in range(12):
        base = rng.uniform(0, 255, (4, 4, 3))
        pixels = np.kron(base, np.ones((10, 10, 1))) + rng.normal(0, 10, (40, 40, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}  # type: ignore[union-attr]


def _recover(student: ir.Model, teacher: Path, images: Path, **options: object) -> RecoverPass:
    settings = dict(
        images=images,
        teacher=teacher,
        max_images=12,
        held_out=4,
        sizes="32",
        block_size=32,
        block_images=8,
        block_steps=5,
        batch=2,
        threads=1,
    )
    settings.update(options)
    recover = RecoverPass(RecoverOptions(**settings))  # type: ignore[arg-type]
    recover(student)
    return recover


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.onnx"
    ir.save(tiny_detector(), path)
    return path


def test_recovery_lowers_the_held_out_loss_and_reports_each_step(
    teacher_path: Path, images: Path
) -> None:
    student = damaged(tiny_detector())
    recover = _recover(student, teacher_path, images, recipe="stats+blocks+e2e", steps=20, lr=0.01)
    report = recover.report
    assert report is not None
    assert [s.step for s in report.steps] == ["stats", "blocks", "e2e"]
    assert report.final_loss < report.initial_loss
    for step in report.steps:
        assert step.kept == (step.loss_after < step.loss_before)
    assert "held-out" in report.table()
    assert report.to_dict()["steps"][0]["step"] == "stats"


def test_recovery_is_deterministic_for_a_seed(teacher_path: Path, images: Path) -> None:
    first, second, other_seed = (damaged(tiny_detector()) for _ in range(3))
    for model, seed in ((first, 0), (second, 0), (other_seed, 5)):
        _recover(model, teacher_path, images, recipe="blocks+e2e", steps=6, lr=0.01, seed=seed)
    a, b, c = _weights(first), _weights(second), _weights(other_seed)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert any(not np.array_equal(a[n], c[n]) for n in a)


def test_a_step_that_makes_the_held_out_loss_worse_is_undone_and_reported(
    teacher_path: Path, images: Path
) -> None:
    student = damaged(tiny_detector())
    before = _weights(student)
    recover = _recover(
        student, teacher_path, images, recipe="e2e", steps=4, lr=50.0, lr_scaling="none"
    )
    report = recover.report
    assert report is not None
    (step,) = report.steps
    assert not step.kept and "REJECTED" in report.table()
    assert step.loss_after >= step.loss_before
    after = _weights(student)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_in_a_pipeline_the_teacher_is_the_model_before_the_approximate_pass(
    images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, ir.Model | None] = {}
    original_call = RecoverPass.call

    def spy(self: RecoverPass, model: ir.Model):  # type: ignore[no-untyped-def]
        seen["original"] = self.original
        return original_call(self, model)

    monkeypatch.setattr(RecoverPass, "call", spy)
    model = tiny_detector()
    weights = _weights(model)
    pipeline = parse_pipeline(
        f"fold-constants,lowrank{{energy=0.5}},recover{{images={images},max_images=12,held_out=4,"
        "sizes=32,block_size=32,recipe=stats,threads=1}"
    )
    run_pipeline(model, pipeline)
    original = seen["original"]
    assert original is not None and original is not model
    assert all(np.array_equal(weights[n], v) for n, v in _weights(original).items() if n in weights)


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
    recover = _recover(
        student, teacher_path, images, recipe="blocks", block_steps=10**6, minutes=0.05
    )
    report = recover.report
    assert report is not None
    assert report.seconds < 60.0, report.seconds  # a 3-second budget, a minute of slack for load
