"""Which schedule each convolution kernel of a built module got: the blocked template (with
which tiles) or TVM's generic loop nest, and how many multiply-accumulates it does.

A build states this per kernel (the compile output and the manifest's ``tuning.conv_kernels``)
because the two differ by 50-100x in speed and nothing else in the output shows it; the
instruction-mix report (targets/arm/instruction_mix.py) reads the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: schedule of a convolution kernel, as the build reports it
TEMPLATE = "template"
GENERIC = "generic"
HAND_SCHEDULED = "hand-scheduled"  # detc's int8 kernels: scheduled when lowered

#: a reduction iteration variable (tirx.IterVar.CommReduce)
_COMM_REDUCE = 2


@dataclass(frozen=True)
class ConvKernel:
    """One TIR function of a built module that computes a convolution."""

    name: str
    schedule: str  # TEMPLATE, GENERIC or HAND_SCHEDULED
    macs: int  # multiply-accumulates of one call (its largest reduction: the convolution)
    calls: int  # how often one inference calls it
    tiles: dict[str, int] | None  # the template's knobs (oc_tile, oh_tile, ow_tile, …)

    def as_manifest(self) -> dict[str, Any]:
        described: dict[str, Any] = {"name": self.name, "schedule": self.schedule}
        described["macs"] = self.macs
        described["calls"] = self.calls
        if self.tiles is not None:
            described["tiles"] = dict(self.tiles)
        return described

    def describe(self) -> str:
        if self.schedule == TEMPLATE and self.tiles:
            knobs = " ".join(f"{k}={v}" for k, v in sorted(self.tiles.items()))
            how = f"template ({knobs})"
        elif self.schedule == GENERIC:
            how = "generic (TVM's default loop nest)"
        else:
            how = self.schedule
        calls = f" × {self.calls} calls" if self.calls != 1 else ""
        return f"conv kernel {self.name}: {how}, {self.macs / 1e6:.2f} M MACs{calls}"


def largest_reduction_macs(func: Any) -> int:
    """Iterations of ``func``'s largest block with a reduction axis: for a convolution (plain or
    blocked, fused with its epilogue) its multiply-accumulates, output padding included."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    largest = 0
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        iter_vars = sch.get(block).iter_vars
        if not any(int(v.iter_type) == _COMM_REDUCE for v in iter_vars):
            continue
        count = 1
        for var in iter_vars:
            count *= int(var.dom.extent)
        largest = max(largest, count)
    return largest


def is_convolution(name: str, func: Any) -> bool:
    from detc.kernels.conv2d_nchwc import has_conv2d_nchwc

    # FuseOps names a fused function after its ops ("fused_conv2d_add_sigmoid")
    return "conv2d" in name or has_conv2d_nchwc(func)


def conv_kernels(mod: Any) -> list[ConvKernel]:
    """Every convolution kernel of ``mod`` (after the tune phase), sorted by name."""
    import tvm

    from detc.kernels.conv2d_nchwc import has_conv2d_nchwc, knobs_of
    from detc.targets.tuning.tasks import call_counts

    calls = call_counts(mod)
    found = []
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not is_convolution(gvar.name_hint, func):
            continue
        tiles = knobs_of(func) if has_conv2d_nchwc(func) else None
        if tiles is not None:
            schedule = TEMPLATE
        elif func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
            schedule = HAND_SCHEDULED
        else:
            schedule = GENERIC
        macs = largest_reduction_macs(func)
        found.append(ConvKernel(gvar.name_hint, schedule, macs, calls[gvar.name_hint], tiles))
    return sorted(found, key=lambda k: k.name)


def summary_line(kernels: list[ConvKernel], template_name: str) -> str:
    """``"convolutions: 32 of 32 kernels (60 calls) use the NEON template"`` and which do not."""
    templated = [k for k in kernels if k.schedule == TEMPLATE]
    calls = sum(k.calls for k in kernels)
    line = (
        f"convolutions: {len(templated)} of {len(kernels)} kernels ({calls} calls) use the "
        f"{template_name}"
    )
    others = [k for k in kernels if k.schedule != TEMPLATE]
    if others:
        shown = ", ".join(f"{k.name} ({k.schedule})" for k in others[:4])
        more = f", +{len(others) - 4} more" if len(others) > 4 else ""
        line += f"; not: {shown}{more}"
    return line
