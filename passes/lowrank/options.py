"""Options and report of ``lowrank``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMS = ("svd", "tucker2", "spatial")


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
