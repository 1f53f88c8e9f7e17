"""Options of ``quantize``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detc.passes.quantize.fp16 import FP16_POLICIES
from detc.passes.quantize.ranges import LEVELS, METHODS

MODES = ("int8", "fp16")


ACTIVATIONS = ("asymmetric", "symmetric")


RANK_BY = ("sqnr", "map")


def _option(default: Any, help: str) -> Any:
    """A dataclass field whose ``metadata["help"]`` documents it."""
    return field(default=default, metadata={"help": help})


def split_names(text: str) -> tuple[str, ...]:
    """Names written as one option value: separated by ``,`` (inside quotes), ``;`` or ``|``."""
    for separator in ";|":
        text = text.replace(separator, ",")
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of ``quantize`` (pipeline text: ``quantize{calib=DIR,method=entropy}``).

    Each field's ``metadata["help"]`` says what it does (for ``detc passes -v``).
    """

    mode: str = _option("int8", "int8: QDQ int8 (needs calib); fp16: float16 weights and ops")
    calib: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "folder of images (or a COCO dataset folder) to calibrate activation ranges on"
    )
    calib_images: int = _option(32, "how many calibration images to draw (with `seed`)")
    spec: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "preprocessing of the calib images (model spec JSON/TOML); default: inferred"
    )
    method: str = _option(
        "percentile",
        "activation ranges: minmax, percentile, entropy (KL) or mse (least squared error)",
    )
    percentile: float = _option(99.999, "percentile method: share of values kept inside the range")
    bins: int = _option(2048, "histogram bins of the percentile, entropy and mse methods")
    activations: str = _option(
        "asymmetric", "asymmetric: uint8 with a zero point (x86 u8s8); symmetric: int8, zero 0"
    )
    per_channel: bool = _option(True, "weights: one scale per output channel (else per tensor)")
    quantize_outputs: bool = _option(
        False, "also quantize the outputs of quantized ops (onnxruntime's QLinearConv form)"
    )
    ops: str = _option("Conv|Gemm|MatMul", "op types to quantize (separate with | or ;)")
    exclude: str = _option("", "node names kept in float (separate with | or ;)")
    max_map_drop: float | None = _option(
        None, "keep the most sensitive layers in float until mAP drops at most this (points)"
    )
    data: Path | None = _option(  # noqa: RUF009 (_option returns a dataclasses.field)
        None, "COCO dataset max_map_drop measures mAP on (default: calib, if it is one)"
    )
    decoder: str | None = _option(None, "decoder for max_map_drop (default: the model spec's)")
    eval_images: int | None = _option(None, "max_map_drop: images of `data` (default: all)")
    rank_by: str = _option(
        "sqnr", "max_map_drop ranks layers by output SQNR (cheap) or by their own mAP change (map)"
    )
    probe_images: int = _option(8, "calibration images the output SQNR is measured on")
    fp16_policy: str = _option(
        "onnxruntime",
        "fp16: onnxruntime keeps ops without an onnxruntime CPU float16 kernel in float32; all "
        "converts every op (for targets computing in float16)",
    )
    seed: int = _option(0, "seed of every random draw (calibration images)")

    def __post_init__(self) -> None:
        choices = {
            "mode": MODES,
            "method": METHODS,
            "activations": ACTIVATIONS,
            "fp16_policy": FP16_POLICIES,
            "rank_by": RANK_BY,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose {', '.join(allowed)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile} must be in (0, 100]")
        if self.bins < 4 * LEVELS:
            raise ValueError(f"bins={self.bins} must be at least {4 * LEVELS}")
        if self.calib_images < 1 or self.probe_images < 1:
            raise ValueError("calib_images and probe_images must be at least 1")
        if self.max_map_drop is not None and self.max_map_drop < 0:
            raise ValueError(f"max_map_drop={self.max_map_drop} must be >= 0 (mAP points)")
        if not self.op_types:
            raise ValueError("ops names no op type")

    @property
    def op_types(self) -> tuple[str, ...]:
        return split_names(self.ops)

    @property
    def excluded(self) -> frozenset[str]:
        return frozenset(split_names(self.exclude))

    @property
    def symmetric_activations(self) -> bool:
        return self.activations == "symmetric"
