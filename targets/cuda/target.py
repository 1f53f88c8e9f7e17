"""NVIDIA GPUs: ``cuda`` (portable) and ``cuda:sm_XX`` (one architecture), built on any machine.

Differs from the base target in

* the TVM target: ``{"kind": "cuda", "arch": "sm_XX"}`` with an LLVM host for this machine's
  CPU (aarch64 for the Jetson preset, cross-compiled from elsewhere);
* schedules: every TIR kernel needs a GPU schedule (thread bindings) before it can build. The
  tune phase applies dlight's default rules (Matmul, GEMV, Reduction, GeneralReduction,
  Fallback) and says which rule took how many kernels; nothing is measured, so a build without
  a GPU is the same as one with;
* precision: float16 graphs (``quantize{mode=fp16}``) and ``precision="fp16"`` compute in
  float16 with float32 accumulation (mixed_precision.py); QDQ int8 runs as float (TVM's CUDA
  pipeline has no int8 lowering of QDQ) and the build says so;
* device code: compiled ahead of time by nvcc into a fatbin embedded in model.so (fatbin.py),
  so where the model runs needs the NVIDIA driver and TVM's runtime, no compiler;
* the device: ``tvm.cuda(0)``; without a GPU, loading the artifact fails with one line.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from detc.compiler.errors import BadInputError, ToolchainMissingError
from detc.targets.context import LIBRARY_FILE, PARAMS_FILE, BuildContext, param_key
from detc.targets.cuda.fatbin import FatbinPacker, cuda_source_modules, kernel_count
from detc.targets.cuda.presets import CUDA_PRESETS, CudaPreset, get_cuda_preset
from detc.targets.cuda.toolkit import local_gpu, require_nvcc
from detc.targets.target import Target, TargetInfo, register_target

#: dlight's GPU rules in the order TVM's CUDA pipeline applies them (the first that fits wins)
DLIGHT_RULES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")

INT8_NOTICE = (
    "int8 on CUDA runs as float: TVM's CUDA pipeline has no int8 lowering of the QDQ graph, so "
    "each quantize/dequantize pair is computed in floating point (the quantized model's "
    "numbers, float's speed)"
)

_HOST_TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}


def _this_machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@contextlib.contextmanager
def _device_code_as_source() -> Iterator[None]:
    """TVM's codegen keeps each CUDA module's source (compiled later by FatbinPacker) instead of
    compiling it where its CUDA runtime is loaded: the same artifact with or without a GPU."""
    previous = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK", None)
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = previous


@register_target
class CudaTarget(Target):
    family = "cuda"
    machine = "x86_64"
    device_kind = "cuda"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16")

    def __init__(self, preset: CudaPreset) -> None:
        super().__init__(preset.name)
        self.preset = preset

    @classmethod
    def from_variant(cls, variant: str | None) -> CudaTarget:
        name = "cuda" if variant is None else f"cuda:{variant.strip().lower()}"
        preset = get_cuda_preset(name)
        host = preset.host_machine or _this_machine()
        if host == "aarch64":
            return CudaOnAarch64Target(preset)
        if host != "x86_64":
            raise BadInputError(f"target {name} needs an x86_64 or aarch64 host, not {host}")
        return cls(preset)

    @classmethod
    def infos(cls) -> list[TargetInfo]:
        return [
            TargetInfo(name=preset.name, description=preset.gpus, enables=preset.enables)
            for preset in CUDA_PRESETS.values()
        ]

    def tvm_target_json(self, num_threads: int) -> dict[str, Any]:
        host: dict[str, Any] = {"kind": "llvm", "mtriple": _HOST_TRIPLES[self.machine]}
        return {"kind": "cuda", "arch": self.preset.arch, "host": host}

    def host_cpu(self) -> dict[str, Any]:
        return {"machine": self.machine, "runs_here": self.machine == _this_machine()}

    def device(self, session: Any = None) -> Any:
        if session is not None:
            return session.device(self.device_kind, 0)
        import tvm

        device = tvm.cuda(0)
        if not device.exist:
            raise BadInputError(
                f"{self.name} artifacts run on an NVIDIA GPU and this machine has none (no CUDA "
                "device or driver): run it where `detc doctor` shows a GPU"
            )
        return device

    # ---- toolchain ------------------------------------------------------------------------
    def _cross_compiling(self) -> bool:
        return self.machine != _this_machine()

    def check_toolchain(self) -> None:
        require_nvcc()
        if self._cross_compiling():
            from detc.targets.remote.toolchain import find_aarch64_cross_compiler

            find_aarch64_cross_compiler()
            return
        from tvm.support.cc import get_cc

        if get_cc() is None:
            raise ToolchainMissingError(
                "no C compiler found to link model.so (tried $CXX, $CC, g++, gcc, clang); "
                "install gcc (e.g. apt-get install g++)"
            )

    def export_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self._cross_compiling():
            from detc.targets.remote.toolchain import find_aarch64_cross_compiler

            options.update(find_aarch64_cross_compiler().export_library_kwargs())
        return options

    # ---- the phases -----------------------------------------------------------------------
    def import_model(self, ctx: BuildContext) -> str:
        from detc.targets.cuda.identifiers import with_c_identifiers

        original = ctx.model
        ctx.model = with_c_identifiers(original)
        try:
            summary = super().import_model(ctx)  # float16 graphs arrive promoted to float32
        finally:
            ctx.model = original
        from detc.targets.int8 import has_quantized_ops

        record = dict(ctx.manifest["precision"])
        if has_quantized_ops(ctx.mod):
            ctx.warn(INT8_NOTICE)
            record["int8"] = "computed in floating point (no int8 lowering on CUDA)"
        promoted = bool(record.get("float16_promoted"))
        if ctx.precision == "fp16" or (ctx.precision is None and promoted):
            from detc.targets.cuda.mixed_precision import to_mixed_precision

            ctx.mod, ctx.params, halved = to_mixed_precision(ctx.mod, ctx.params, ctx.num_inputs)
            record.update(compute="float16", accumulate="float32")
            summary = summary.replace(", float16 computed in float32", "")
            summary += f", float16 with float32 accumulation ({halved} weights in float16)"
        else:
            record.update(compute="float32", accumulate="float32")
        record["requested"] = ctx.precision or "as-model"
        ctx.manifest["precision"] = record
        return summary

    def tune(self, ctx: BuildContext) -> str:
        from tvm.s_tir import dlight

        gpu = local_gpu()
        if ctx.tuning is not None:
            why = "no CUDA GPU on this machine" if gpu is None else "detc cannot tune CUDA yet"
            ctx.warn(f"tuning skipped ({why}): the kernels keep dlight's default schedules")
        taken: dict[str, int] = {}
        with ctx.tvm_target:
            for rule in DLIGHT_RULES:
                before = _scheduled(ctx.mod)
                ctx.mod = dlight.ApplyDefaultSchedule(getattr(dlight.gpu, rule)())(ctx.mod)
                taken[rule] = _scheduled(ctx.mod) - before
        kernels = sum(taken.values())
        unscheduled = _count_primfuncs(ctx.mod) - _scheduled(ctx.mod)
        ctx.manifest["tuning"] = {
            "tuned": False,
            "trials": 0,
            "database_digest": None,
            "untuned_tasks": kernels,
            "schedules": "dlight",
            "dlight_rules": taken,
        }
        by_rule = ", ".join(f"{rule} {count}" for rule, count in taken.items() if count)
        where = "no GPU here to tune on" if gpu is None else f"GPU here: {gpu}, not tuned"
        ctx.warn(
            f"untuned CUDA build: {kernels} kernels use dlight's default GPU schedules "
            f"({by_rule}); {where}"
        )
        summary = f"dlight default schedules: {by_rule}"
        if unscheduled:
            summary += f"; {unscheduled} without a schedule"
        return summary

    def build(self, ctx: BuildContext) -> str:
        import tvm

        with _device_code_as_source():
            ctx.executable = tvm.compile(ctx.mod, target=ctx.tvm_target)
        kernels = sum(
            kernel_count(str(m.inspect_source(""))) for m in cuda_source_modules(ctx.executable.mod)
        )
        return f"CUDA C for {self.preset.arch}, {kernels} kernels; host {self.machine}"

    def export(self, ctx: BuildContext) -> str:
        packer = FatbinPacker(require_nvcc(), self.preset.sass, self.preset.arch)
        workspace = ctx.staging_dir / ".export-workspace"
        workspace.mkdir()
        library = ctx.staging_dir / LIBRARY_FILE
        ctx.executable.export_library(
            str(library),
            workspace_dir=str(workspace),
            fpack_imports=packer,
            **self.export_options(),
        )
        shutil.rmtree(workspace, ignore_errors=True)
        np.savez(
            ctx.staging_dir / PARAMS_FILE, **{param_key(i): p for i, p in enumerate(ctx.params)}
        )
        sass = sorted({e.arch for e in packer.entries if e.kind == "sass"})
        ptx = sorted({e.arch for e in packer.entries if e.kind == "ptx"})
        return (
            f"{LIBRARY_FILE} {library.stat().st_size / 1e6:.1f} MB with a "
            f"{packer.fatbin_bytes / 1e3:.0f} kB fatbin ({packer.kernels} kernels; SASS "
            f"{', '.join(sass)}; PTX {', '.join(ptx)}), {PARAMS_FILE} {len(ctx.params)} arrays"
        )


class CudaOnAarch64Target(CudaTarget):
    """A CUDA target whose host code is aarch64 (Jetson; Grace Hopper when built there)."""

    machine = "aarch64"


def _count_primfuncs(mod: Any) -> int:
    import tvm

    return sum(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values())


def _scheduled(mod: Any) -> int:
    import tvm

    return sum(
        isinstance(f, tvm.tirx.PrimFunc) and bool(f.attrs and f.attrs.get("tirx.is_scheduled"))
        for f in mod.functions.values()
    )
