"""What the built-in passes declare for the tools: calibration images, sweep option, report."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import pytest

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pass_base import DetcPass, PassResult
from detc.compiler.ir.pipeline import parse_pipeline, with_calibration_images
from detc.passes import BUILTIN_PASSES


def test_only_the_approximate_passes_read_images_and_sweep() -> None:
    reads_images = {p.name: p.calibration_option for p in BUILTIN_PASSES if p.calibration_option}
    sweeps = {p.name: p.sweep_option for p in BUILTIN_PASSES if p.sweep_option}
    assert reads_images == {
        "prune": "calib",
        "lowrank": "calib",
        "quantize": "calib",
        "recover": "images",
    }
    assert sweeps == {"prune": "mac_reduction", "lowrank": "mac_reduction"}
    for pass_cls in BUILTIN_PASSES:
        pass_cls.validate_declaration()
        assert pass_cls().report is None  # nothing decided before the first run


def test_calibration_images_reach_the_steps_that_declare_them_and_set_none() -> None:
    pipeline = parse_pipeline("fold-conv-bn,prune{ratio=0.2},lowrank{calib=mine},quantize")
    given, names = with_calibration_images(pipeline, "imgs")
    assert str(given) == (
        "fold-conv-bn,prune{ratio=0.2,calib=imgs},lowrank{calib=mine},quantize{calib=imgs}"
    )
    assert names == ["prune", "quantize"]  # lowrank keeps its own calibration folder
    exact_only, none = with_calibration_images(parse_pipeline("fold-conv-bn"), "imgs")
    assert str(exact_only) == "fold-conv-bn" and none == []


@dataclass(frozen=True)
class _StrengthOptions:
    strength: float = 0.5


class _MisdeclaredPass(DetcPass):
    """A pass whose sweep option is not one of its options."""

    name = "misdeclared"
    exact = False
    Options = _StrengthOptions
    sweep_option = "ratio"

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)


def test_a_declared_option_must_be_one_of_the_pass_options() -> None:
    with pytest.raises(BadInputError, match=r"`sweep_option = 'ratio'` is not one of its options"):
        _MisdeclaredPass.validate_declaration()
