"""x86-64 CPUs through LLVM: ``x86`` (the CPU detc runs on) or ``x86:<mcpu>`` (a named CPU).

Differs from the base target in the TVM target JSON (``mcpu`` from /proc/cpuinfo, never
"native", which LLVM 22 here refuses), in needing a host C compiler to link ``model.so``, and in
offering two pipelines:

    plain    the imported graph (int8 kernels with their default tiles); every untuned build,
             and a tuned one with ``layout="plain"``
    blocked  weights bound as constants (the artifact's calling convention becomes "inputs")
             and convolutions in the blocked NCHW[x]c layout whose block is one vector register
             of float32 (16 with AVX-512, 8 with AVX2), see layout.py; int8 kernels with tiles
             from the tuning database. A tuned build's default (``layout="blocked"``).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

from detc.compiler.errors import BadInputError, ToolchainMissingError
from detc.targets.blocked_cpu import BlockedCpuTarget
from detc.targets.context import BuildContext
from detc.targets.cpu import REQUIRED_FLAGS, HostCpu, detect_host_cpu, missing_flags
from detc.targets.target import TargetInfo, register_target
from detc.targets.tuning.options import TuningOptions

_EXAMPLE_MCPUS = ("znver3", "znver4", "skylake-avx512", "haswell", "x86-64-v3")


def _is_x86_host() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@register_target
class X86Target(BlockedCpuTarget):
    family = "x86"
    machine = "x86_64"

    def __init__(self, name: str, mcpu: str, host: HostCpu) -> None:
        super().__init__(name)
        self.mcpu = mcpu
        self.host = host

    @classmethod
    def from_variant(cls, variant: str | None) -> X86Target:
        if not _is_x86_host():
            raise BadInputError(
                f"target x86 needs an x86_64 machine to build on (this is {platform.machine()})"
            )
        host = detect_host_cpu()
        if variant is None:
            return cls("x86", host.mcpu, host)
        mcpu = variant.strip().lower()
        if mcpu == "native":
            raise BadInputError(
                "target 'x86:native' is refused by LLVM 22; use 'x86' (detects this CPU, "
                f"here {host.mcpu}) or name a CPU, e.g. x86:{_EXAMPLE_MCPUS[0]}"
            )
        if not _llvm_knows_x86_cpu(mcpu):
            raise BadInputError(
                f"unknown x86 CPU '{variant}' in target 'x86:{variant}'; use an LLVM CPU name "
                f"such as {', '.join(_EXAMPLE_MCPUS)} (detc targets lists them)"
            )
        return cls(f"x86:{mcpu}", mcpu, host)

    @classmethod
    def infos(cls) -> list[TargetInfo]:
        if not _is_x86_host():
            return [
                TargetInfo(
                    name="x86",
                    description=f"x86-64 CPUs (not buildable here: this is {platform.machine()})",
                    enables="LLVM x86-64 code; build on an x86_64 machine",
                )
            ]
        host = detect_host_cpu()
        known = ", ".join(sorted(REQUIRED_FLAGS))
        return [
            TargetInfo(
                name="x86",
                description=f"this machine's CPU ({host.model_name})",
                enables=(
                    f"LLVM mcpu={host.mcpu} ({host.mcpu_reason}), "
                    f"{host.physical_cores} physical core(s)"
                ),
            ),
            TargetInfo(
                name="x86:<mcpu>",
                description="a named x86-64 CPU, to build for another machine",
                enables=f"LLVM mcpu=<mcpu>; detc knows the features of: {known}",
            ),
        ]

    def tvm_target_json(self, num_threads: int) -> dict[str, Any]:
        return {"kind": "llvm", "mcpu": self.mcpu, "num-cores": num_threads}

    def host_cpu(self) -> dict[str, Any]:
        described = self.host.as_manifest()
        described["runs_here"] = not missing_flags(self.mcpu, self.host.flags)
        return described

    def default_num_threads(self) -> int:
        return self.host.physical_cores

    def channel_block(self) -> int:
        """float32 lanes of one vector register on this target's CPU."""
        features = REQUIRED_FLAGS.get(self.mcpu)
        if features is None:  # a CPU detc's table lacks: trust what this host supports
            features = self.host.flags
        if "avx512f" in features:
            return 16
        return 8 if "avx" in features else 4

    def int8_lowering(self, ctx: BuildContext | None) -> Any:
        if ctx is None:
            return _int8_lowering()

        def searched(seconds: float) -> None:
            # the int8 tile search counts against --tune-minutes
            ctx.searched_seconds += seconds

        return _int8_lowering(ctx.tuning, searched, self.device())

    def check_toolchain(self) -> None:
        from tvm.support.cc import get_cc

        if get_cc() is None:
            raise ToolchainMissingError(
                "no C compiler found to link model.so (tried $CXX, $CC, g++, gcc, clang); "
                "install gcc (e.g. apt-get install g++)"
            )


def _llvm_knows_x86_cpu(mcpu: str) -> bool:
    import tvm
    from tvm.target import codegen

    if mcpu in REQUIRED_FLAGS:
        return True
    archlist = codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"}))
    return mcpu in {str(name) for name in archlist}


def _int8_lowering(
    tuning: TuningOptions | None = None,
    on_search: Callable[[float], None] | None = None,
    device: Any = None,
) -> Any:
    """The QDQ → int8 kernel lowering as a build applies it: conv outputs left in float by the
    quantize pass are lowered too (exact integer sums, dequantized), and so are chains
    onnxruntime runs in float (a SiLU or ReLU before the quantize, a float bias) — the integer
    path differs from onnxruntime's float evaluation there by at most 1 in a few 8-bit values,
    which is the price of running a quantized model as integers at all. With ``tuning``
    options each kernel's schedule comes from the tuning database's measured tiles (searched
    now with ``--tune``, on ``device``)."""
    from detc.targets.int8 import int8_tile_chooser, lower_qdq_conv2d_to_int8

    tiles = int8_tile_chooser(tuning, device, on_search)
    return lower_qdq_conv2d_to_int8(allow_approximate=True, float_outputs=True, tiles=tiles)
