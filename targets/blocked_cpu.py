"""What the CPU targets (x86, arm) share: two pipelines, the blocked one by default.

    plain    the imported graph (int8 kernels with their default tiles); the fallback for a model
             the blocked layout cannot express, and a tuned build with ``layout="plain"``
    blocked  weights bound as constants (the artifact's calling convention becomes "inputs")
             and convolutions in the blocked NCHW[x]c layout whose block is one or more vector
             registers of float32 (x86/layout.py), scheduled by detc's convolution template
             with the tuning database's tiles, else the target's default tiles

A subclass says how wide its block is (:meth:`channel_block`), how it lowers int8 QDQ
convolutions (:meth:`int8_lowering`) and, where its registers differ from AVX-512's, the
template's default tiles (:meth:`Target.conv_template_tiles`). The tune phase records which
schedule each convolution kernel got (targets/tuning/conv_schedules.py) and warns about the
ones left to TVM's generic schedule.
"""

from __future__ import annotations

from typing import Any

from detc.targets.context import BuildContext, Phase
from detc.targets.target import DEFAULT_PIPELINE, Target, count_tir_functions
from detc.targets.tuning.options import TuningOptions

PLAIN_PIPELINE = "plain"
BLOCKED_PIPELINE = "blocked"


class BlockedCpuTarget(Target):
    #: how the compile output names the convolution template on this target
    template_name = "blocked template"
    #: print one line per convolution kernel (its schedule and tiles) while compiling
    describe_each_kernel = False

    def channel_block(self) -> int:
        """float32 lanes of the blocked layout's channel block on this target's CPU."""
        raise NotImplementedError

    def int8_lowering(self, ctx: BuildContext | None) -> Any:
        """The QDQ → int8 kernel lowering pass (``ctx`` None: the plain pipeline's, default
        tiles; else the blocked build's, which may consult ``ctx.tuning``)."""
        raise NotImplementedError

    # ---- the pipelines --------------------------------------------------------------------
    def pipelines(self) -> dict[str, list[Phase]]:
        return {
            BLOCKED_PIPELINE: [
                Phase("import", self.import_with_constant_weights),
                Phase("legalize", self.legalize_blocked),
                Phase("tune", self.tune),
                Phase("build", self.build),
                Phase("export", self.export),
            ],
            # the base target's phases (its import binds int8 parameters here)
            PLAIN_PIPELINE: super().pipelines()[DEFAULT_PIPELINE],
        }

    def pipeline_for(self, tuning: TuningOptions | None) -> str:
        chosen = tuning if tuning is not None else self.default_tuning()
        return BLOCKED_PIPELINE if chosen.layout == BLOCKED_PIPELINE else PLAIN_PIPELINE

    def fallback_pipeline(self, pipeline: str | None) -> str | None:
        # some convolutions the blocked layout cannot express yet (seen in the zoo: a DFL head's
        # 16-channel conv, non-multiple depthwise convs, ConvTranspose necks)
        return PLAIN_PIPELINE if pipeline == BLOCKED_PIPELINE else None

    def default_tuning(self) -> TuningOptions:
        # The blocked template's default tiles and whatever the tuning database holds for this
        # CPU; no search runs (tune=False). On yolov5n x86: ~1.1x onnxruntime where TVM's
        # default schedules ran ~57x.
        return TuningOptions(tune=False)

    # ---- plain ----------------------------------------------------------------------------
    def import_model(self, ctx: BuildContext) -> str:
        summary = super().import_model(ctx)
        from detc.targets.int8 import bind_quantization_params, has_quantized_ops

        if has_quantized_ops(ctx.mod):
            # The int8 lowering reads quantized weights, scales and zero points as constants.
            ctx.mod, ctx.params = bind_quantization_params(ctx.mod, ctx.params, ctx.num_inputs)
        return summary

    def legalize_passes(self) -> list[Any]:
        # First: FoldConstant would turn dequantize(W_q) into a float weight and hide the pattern.
        return [self.int8_lowering(None), *super().legalize_passes()]

    # ---- blocked --------------------------------------------------------------------------
    def import_with_constant_weights(self, ctx: BuildContext) -> str:
        summary = super().import_model(ctx)
        from detc.targets.x86.layout import bind_weights_as_constants

        ctx.mod = bind_weights_as_constants(ctx.mod, ctx.params, ctx.num_inputs)
        ctx.manifest["calling_convention"] = "inputs"
        bound = len(ctx.params)
        ctx.params = []
        return f"{summary}, {bound} bound as constants"

    def legalize_blocked(self, ctx: BuildContext) -> str:
        import tvm

        from detc.targets.x86.layout import blocked_layout_passes

        block = self.channel_block()
        passes = [self.int8_lowering(ctx), *blocked_layout_passes(block)]
        with ctx.tvm_target:
            ctx.mod = tvm.transform.Sequential(passes)(ctx.mod)
        return f"{count_tir_functions(ctx.mod)} TIR functions, NCHW{block}c"

    # ---- both -----------------------------------------------------------------------------
    def tune(self, ctx: BuildContext) -> str:
        summary = super().tune(ctx)
        from detc.targets.tuning.conv_schedules import GENERIC, conv_kernels, summary_line

        kernels = conv_kernels(ctx.mod)
        ctx.manifest["tuning"]["conv_kernels"] = [k.as_manifest() for k in kernels]
        if self.describe_each_kernel:
            for kernel in kernels:
                ctx.progress(kernel.describe())
        ctx.progress(summary_line(kernels, self.template_name))
        generic = [k.name for k in kernels if k.schedule == GENERIC]
        if generic and ctx.pipeline != PLAIN_PIPELINE:
            # the plain pipeline's fallback notice already says this for the whole model
            ctx.warn(
                f"{self.name}: {len(generic)} of {len(kernels)} convolution kernels use TVM's "
                f"generic schedule (correct, but 50-100x slower): {', '.join(generic[:4])}"
                + (f", +{len(generic) - 4} more" if len(generic) > 4 else "")
            )
        return summary
