"""ARM (aarch64 Linux) targets: named CPU presets, cross-compiled export, ELF check.

Two pipelines, as on x86 (targets/x86/target.py):

    blocked  the default: weights bound as constants, convolutions in the blocked NCHW[x]c
             layout (targets/x86/layout.py) with the NEON register tiles of the convolution
             template (kernels/conv2d_nchwc.py): 4-lane ``fmla`` on the innermost
             output-channel axis; records of a tuning database (tuned on a board over RPC,
             imported with ``detc tune --import-db``) replace the default tiles
    plain    the imported graph with TVM's default schedules: the fallback when the blocked
             layout cannot express a model (the build says so)

A preset is a TVM target JSON dict for one core family. `mcpu` lets LLVM schedule and select
instructions for that core; `mattr` spells out the ML-relevant features the core has (NEON,
fp16 arithmetic, int8 dot product, int8 matrix multiply, bf16, SVE) so the target's
``feature.has_*`` keys, which TVM schedules consult, are explicit rather than implied.
Artifacts are linked with the aarch64 cross compiler (`detc.targets.remote.toolchain`) and
checked to be aarch64 ELF shared objects; on an x86 machine they are verified under qemu
(`detc.targets.remote.emulator`), which proves numerics only.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detc.compiler.errors import BadInputError, ToolchainMissingError
from detc.compiler.fileio import write_file_atomically
from detc.targets.blocked_cpu import BlockedCpuTarget
from detc.targets.context import LIBRARY_FILE, BuildContext
from detc.targets.remote.toolchain import (
    AARCH64_TRIPLE,
    EM_AARCH64,
    CrossCompiler,
    elf_machine,
    find_aarch64_cross_compiler,
)
from detc.targets.target import TargetInfo, register_target
from detc.targets.tuning.tasks import TemplateTiles

if TYPE_CHECKING:
    import tvm


@dataclass(frozen=True)
class ArmPreset:
    """One ARM CPU preset: what `--target arm:<core>` compiles for."""

    name: str
    mcpu: str | None  # None: LLVM's generic aarch64 (runs on every Armv8-A core)
    mattr: tuple[str, ...]
    num_cores: int  # default thread count MetaSchedule tunes for; override per board
    description: str
    #: output channels per block of the blocked layout: one 128-bit NEON register of float32
    #: (a multiple of 4; 4 lets every 4k-channel convolution into the template)
    channel_block: int = 4
    #: NEON registers the template's default tiles keep as accumulators, of the 32 every
    #: aarch64 core has. 16 (4 channel blocks × 4 pixels): LLVM unrolls the 4 input channels of
    #: a block and keeps their input values in registers too; with 20 (4 × 5) it spilled two
    #: accumulators per iteration of the main loop, with 16 none (instruction_mix.py counts
    #: them). Same for every preset: no board here to measure per core; a tuning database
    #: from a board replaces these defaults.
    accumulator_registers: int = 16

    def tvm_target(self, *, num_cores: int | None = None) -> dict[str, object]:
        """The TVM target JSON dict (pass through ``tvm.target.Target(...)``, never bare)."""
        target: dict[str, object] = {"kind": "llvm", "mtriple": AARCH64_TRIPLE}
        if self.mcpu is not None:
            target["mcpu"] = self.mcpu
        target["mattr"] = list(self.mattr)
        target["num-cores"] = num_cores if num_cores is not None else self.num_cores
        return target


#: float32 lanes of a NEON register
NEON_LANES = 4

_NEON = "+neon"
_FP16 = "+fullfp16"  # half-precision vector arithmetic (Armv8.2-A FP16)
_DOTPROD = "+dotprod"  # SDOT/UDOT: int8 dot product into int32 (Armv8.2-A, optional)
_I8MM = "+i8mm"  # SMMLA/UMMLA: int8 2x8x2 matrix multiply (Armv8.6-A)
_BF16 = "+bf16"
_SVE = "+sve"

ARM_PRESETS: Mapping[str, ArmPreset] = {
    preset.name: preset
    for preset in (
        ArmPreset(
            "arm",
            None,
            (_NEON,),
            4,
            "generic Armv8-A + NEON: runs on any 64-bit ARM core; no fp16 arithmetic, "
            "dot product or i8mm",
        ),
        ArmPreset(
            "arm:cortex-a53",
            "cortex-a53",
            (_NEON,),
            4,
            "Cortex-A53 (Armv8.0-A, in-order; Raspberry Pi 3, many low-cost SoCs): NEON only, "
            "no dot product",
        ),
        ArmPreset(
            "arm:cortex-a55",
            "cortex-a55",
            (_NEON, _FP16, _DOTPROD),
            4,
            "Cortex-A55 (Armv8.2-A, in-order; RK3566/RK3568, little cores of phones): NEON, "
            "fp16 arithmetic, int8 dot product; no i8mm",
        ),
        ArmPreset(
            "arm:cortex-a72",
            "cortex-a72",
            (_NEON,),
            4,
            "Cortex-A72 (Armv8.0-A, out-of-order; Raspberry Pi 4, RK3399): NEON only, "
            "no dot product",
        ),
        ArmPreset(
            "arm:cortex-a76",
            "cortex-a76",
            (_NEON, _FP16, _DOTPROD),
            4,
            "Cortex-A76 (Armv8.2-A, out-of-order; Raspberry Pi 5, RK3588 big cores): NEON, "
            "fp16 arithmetic, int8 dot product; no i8mm",
        ),
        ArmPreset(
            "arm:neoverse-n1",
            "neoverse-n1",
            (_NEON, _FP16, _DOTPROD),
            4,
            "Neoverse N1 (Armv8.2-A server; AWS Graviton2, Ampere Altra): NEON, fp16 arithmetic, "
            "int8 dot product; no i8mm, no SVE",
        ),
        ArmPreset(
            "arm:neoverse-v1",
            "neoverse-v1",
            (_NEON, _FP16, _DOTPROD, _I8MM, _BF16, _SVE),
            4,
            "Neoverse V1 (Armv8.4-A server; AWS Graviton3): NEON, fp16, int8 dot product, i8mm, "
            "bf16, 256-bit SVE",
        ),
    )
}


def get_arm_preset(name: str) -> ArmPreset:
    """The preset called `name` ("arm", "arm:cortex-a55", …); `BadInputError` lists the others."""
    preset = ARM_PRESETS.get(name)
    if preset is None:
        raise BadInputError(f"unknown ARM target '{name}': choose one of {', '.join(ARM_PRESETS)}")
    return preset


def arm_target(name: str, *, num_cores: int | None = None) -> dict[str, object]:
    """TVM target JSON dict of the preset `name`, optionally for another core count."""
    return get_arm_preset(name).tvm_target(num_cores=num_cores)


def export_arm_library(
    executable: tvm.runtime.Executable | tvm.runtime.Module,
    path: Path,
    *,
    compiler: CrossCompiler | None = None,
) -> Path:
    """Link `executable` (built for an ARM target) into an aarch64 shared object at `path`.

    Written atomically (detc.compiler.fileio); `ToolchainMissingError` when no cross compiler is
    installed or when the configured one did not produce an aarch64 ELF object.
    """
    linker = compiler or find_aarch64_cross_compiler()
    path = Path(path)

    def link(staged: Path) -> None:
        # export_library picks the link step from the suffix: keep ".so" last.
        linked = staged.with_name(f"{staged.name}.so")
        try:
            executable.export_library(str(linked), **linker.export_library_kwargs())
            _require_aarch64_output(linked, linker, shown_as=path.name)
            linked.replace(staged)
        finally:
            linked.unlink(missing_ok=True)

    write_file_atomically(path, link)
    return path


def _require_aarch64_output(
    library: Path, compiler: CrossCompiler, *, shown_as: str | None = None
) -> None:
    machine = elf_machine(library)
    if machine != EM_AARCH64:
        raise ToolchainMissingError(
            f"{compiler.cc} linked {shown_as or library.name} for ELF machine {machine}, not "
            f"aarch64 ({EM_AARCH64}): point DETC_AARCH64_CC at an aarch64 cross compiler"
        )


def build_arm_library(
    relax_mod: tvm.IRModule,
    preset: str,
    path: Path,
    *,
    num_cores: int | None = None,
) -> Path:
    """Compile a Relax module for the ARM preset `preset` and export it to `path` (aarch64 ELF).

    The module is compiled as given (no tuning); its ``main`` keeps whatever calling convention
    it has. The cross compiler is looked up first so a missing one fails before compiling.
    """
    import tvm

    compiler = find_aarch64_cross_compiler()
    target = tvm.target.Target(arm_target(preset, num_cores=num_cores))
    executable = tvm.compile(relax_mod, target=target)
    return export_arm_library(executable, Path(path), compiler=compiler)


def assert_aarch64_elf(path: Path) -> None:
    """`BadInputError` unless `path` is an aarch64 ELF file (e.g. before sending it to a board)."""
    machine = elf_machine(Path(path))
    if machine != EM_AARCH64:
        what = "not an ELF file" if machine is None else f"an ELF file for machine {machine}"
        raise BadInputError(f"{path} is {what}, not aarch64: rebuild it with --target arm")


@register_target
class ArmTarget(BlockedCpuTarget):
    """``arm`` / ``arm:<core>``: aarch64 Linux, linked with the cross compiler.

    Differs from the base target in its TVM target (a preset), in linking with the aarch64 cross
    compiler, in checking that the exported library really is an aarch64 ELF object, and in its
    two pipelines (the module docstring): fp32 convolutions get the blocked NEON template by
    default. The tune phase lists each convolution kernel's schedule; export reports the
    library's static instruction mix (instruction_mix.py).
    """

    family = "arm"
    machine = "aarch64"
    template_name = "NEON blocked template"
    # no board to time it: the compile output is where a user sees each kernel's schedule
    describe_each_kernel = True

    def __init__(self, preset: ArmPreset) -> None:
        super().__init__(preset.name)
        self.preset = preset

    @classmethod
    def from_variant(cls, variant: str | None) -> ArmTarget:
        return cls(get_arm_preset("arm" if variant is None else f"arm:{variant.strip().lower()}"))

    @classmethod
    def infos(cls) -> list[TargetInfo]:
        return [
            TargetInfo(
                name=preset.name,
                description=preset.description,
                enables=(
                    f"LLVM mtriple={AARCH64_TRIPLE} mcpu={preset.mcpu or 'generic'} "
                    f"mattr={','.join(preset.mattr)}, {preset.num_cores} cores by default"
                ),
            )
            for preset in ARM_PRESETS.values()
        ]

    def tvm_target_json(self, num_threads: int) -> dict[str, Any]:
        return self.preset.tvm_target(num_cores=num_threads)

    def default_num_threads(self) -> int:
        return self.preset.num_cores

    def host_cpu(self) -> dict[str, Any]:
        # The artifact is for another machine; record what it was built for.
        return {
            "mcpu": self.preset.mcpu or "generic",
            "mattr": list(self.preset.mattr),
            "runs_here": platform.machine().lower() in ("aarch64", "arm64"),
        }

    def channel_block(self) -> int:
        return self.preset.channel_block

    def int8_lowering(self, ctx: BuildContext | None) -> Any:
        return _int8_lowering()

    def conv_template_tiles(self) -> TemplateTiles:
        return self._neon_tiles

    def _neon_tiles(self, out_blocks: int, out_h: int, out_w: int) -> dict[str, int]:
        """Default tiles of the convolution template for this preset's NEON registers."""
        from detc.kernels.conv2d_nchwc import register_tiles

        return register_tiles(
            out_blocks,
            out_h,
            out_w,
            vectors_per_block=max(1, self.preset.channel_block // NEON_LANES),
            accumulators=self.preset.accumulator_registers,
        )

    def check_toolchain(self) -> None:
        find_aarch64_cross_compiler()

    def export_options(self) -> dict[str, Any]:
        return find_aarch64_cross_compiler().export_library_kwargs()

    def export(self, ctx: BuildContext) -> str:
        summary = super().export(ctx)
        library = ctx.staging_dir / LIBRARY_FILE
        _require_aarch64_output(library, find_aarch64_cross_compiler())
        from detc.targets.arm.instruction_mix import instruction_mix_lines

        for line in instruction_mix_lines(library, ctx.manifest["tuning"].get("conv_kernels", [])):
            ctx.progress(line)
        return f"{summary}, aarch64 ELF"


def _int8_lowering() -> Any:
    """The QDQ → int8 kernel lowering as on x86 (see its ``_int8_lowering``); the kernel uses
    sdot where the preset has +dotprod, widening NEON multiplies elsewhere."""
    from detc.targets.int8 import lower_qdq_conv2d_to_int8

    return lower_qdq_conv2d_to_int8(allow_approximate=True, float_outputs=True)
