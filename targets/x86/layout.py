"""Relax passes that put a CPU convolution network into the blocked NCHW[x]c layout.

TVM's ``ConvertLayout`` carries the layout through the elementwise ops, concatenations and
pools between convolutions, but converts only convolutions whose channel counts are whole
blocks. The passes here cover the two kinds it leaves behind in a detector:

* a head convolution whose *output* channels are not whole blocks (YOLO's 3×85 = 255): its
  weights get zero output channels up to a whole block and a ``strided_slice`` drops them again
  (:func:`pad_output_channels`), so ConvertLayout converts it. The slice moves below the bias
  and the activation, which then run in the convolution's blocked epilogue; the conversion back
  to NCHW fuses with the reshape/transpose after it instead;
* a first convolution whose *input* channels are not (RGB): the legalization computes its output
  directly in blocks and converts it back to NCHW in the same function; FuseOps then fuses the
  conversion with the next op's conversion to blocks, and the two cancel in TIR.

Weights must be bound as constants (``BindParams``) for the blocked kernels to be packed at
compile time; :func:`fold_constant_layout_transforms` does that packing in numpy rather than
by compiling one TIR function per weight (FoldConstant took 20-35 s for yolov5n here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.ir.expr import Constant
from tvm.relax import expr_functor

from detc.kernels.conv2d_nchwc import blocked_to_nchw, conv2d_nchwc, pack_kernel
from detc.kernels.fast_math import legalize_sigmoid


def bind_weights_as_constants(
    mod: tvm.IRModule, params: list[np.ndarray], num_inputs: int
) -> tvm.IRModule:
    """``main``'s parameters after its ``num_inputs`` graph inputs bound to ``params`` as
    constants: what the layout passes need to prepack weights at compile time (no per-inference
    weight transforms); ``main`` then takes the graph inputs only."""
    main = mod["main"]
    weights = dict(zip(main.params[num_inputs:], params, strict=True))
    return relax.transform.BindParams("main", weights)(mod)


def blocked_layouts(block: int) -> tuple[str, str]:
    """(data layout, kernel layout) for channel block ``block``: ("NCHW16c", "OIHW16i16o")."""
    return f"NCHW{block}c", f"OIHW{block}i{block}o"


def _conv_attrs(call: relax.Call) -> tuple[str, str, str, int]:
    attrs = call.attrs
    return (
        str(attrs.data_layout),
        str(attrs.kernel_layout),
        str(attrs.out_layout),
        int(attrs.groups),
    )


def _is_conv2d(expr: relax.Expr) -> bool:
    return isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d"


@expr_functor.mutator
class _PadOutputChannels(expr_functor.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, block: int) -> None:
        super().__init__(mod)
        self.block = block
        self.padded = 0
        #: the channel slices this pass made: (slice call, padded tensor, channels kept)
        self._slices: list[tuple[relax.Call, relax.Expr, int]] = []

    def _slice_of(self, expr: relax.Expr) -> tuple[relax.Expr, int] | None:
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        for made, padded, channels in self._slices:
            if bound is not None and bound.same_as(made):
                return padded, channels
        return None

    def _sliced(self, padded: relax.Expr, channels: int) -> relax.Expr:
        result = relax.op.strided_slice(padded, axes=[1], begin=[0], end=[channels])
        self._slices.append((result, padded, channels))
        return result

    def _sink_slice(self, call: relax.Call) -> relax.Expr | None:
        """``op(slice(y), per-channel constant)`` → ``slice(op(y, zero-padded constant))`` and
        ``act(slice(y))`` → ``slice(act(y))``: the bias and activation of a padded convolution
        stay in the blocked layout, so they fuse into its epilogue and the conversion back
        to NCHW is pure data movement."""
        name = getattr(call.op, "name", "")
        if name in _SLICE_SINKING_UNARY and len(call.args) == 1:
            found = self._slice_of(call.args[0])
            if found is None:
                return None
            padded, channels = found
            inner = self.builder_.emit(relax.Call(call.op, [padded], call.attrs, call.ty_args))
            return self._sliced(inner, channels)
        if name not in _SLICE_SINKING_BINARY or len(call.args) != 2:
            return None
        found = self._slice_of(call.args[0])
        constant = _bound_constant(self, call.args[1])
        if found is None or constant is None:
            return None
        padded, channels = found
        array = constant.value.numpy()
        if array.ndim != 4 or array.shape[0] != 1 or array.shape[2:] != (1, 1):
            return None
        if array.shape[1] != channels:
            return None
        total = int(padded.ty.shape[1])
        extra = np.zeros((1, total - channels, 1, 1), dtype=array.dtype)
        widened = relax.const(np.concatenate([array, extra], axis=1))
        inner = self.builder_.emit(relax.Call(call.op, [padded, widened], call.attrs, call.ty_args))
        return self._sliced(inner, channels)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        sunk = self._sink_slice(call)
        if sunk is not None:
            return sunk
        if not _is_conv2d(call):
            return call
        data_layout, kernel_layout, out_layout, groups = _conv_attrs(call)
        weight = call.args[1]
        if (data_layout, kernel_layout, out_layout, groups) != ("NCHW", "OIHW", "NCHW", 1):
            return call
        if not isinstance(weight, Constant):
            return call
        out_channels = int(weight.value.shape[0])
        # Any input: whole blocks go through ConvertLayout, others (RGB, or channel counts a
        # prune left at a multiple of 8) through the legalization's NCHW-in / blocked-out
        # kernel. Left alone, such a conv got TVM's generic NCHW conv2d: 50 ms for yolov5n's
        # first layer cut to 8 channels, 25x the blocked kernel.
        if out_channels % self.block != 0:
            array = weight.value.numpy()
            padded = -(-out_channels // self.block) * self.block
            extra = np.zeros((padded - out_channels, *array.shape[1:]), dtype=array.dtype)
            new_weight = relax.const(np.concatenate([array, extra]))
            conv = self.builder_.emit(
                relax.Call(call.op, [call.args[0], new_weight], call.attrs, call.ty_args)
            )
            self.padded += 1
            return self._sliced(conv, out_channels)
        return call


#: ops whose per-channel work may move before a padded convolution's channel slice
_SLICE_SINKING_UNARY = ("relax.sigmoid",)
_SLICE_SINKING_BINARY = ("relax.add", "relax.multiply")


def _bound_constant(mutator: expr_functor.PyExprMutator, expr: relax.Expr) -> Constant | None:
    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        expr = expr if bound is None else bound
    return expr if isinstance(expr, Constant) else None


def pad_output_channels(block: int) -> tvm.transform.Pass:
    """Zero-pad the output channels of NCHW convolutions to whole blocks (and slice them off
    again), so that ConvertLayout (whole-block inputs) or the NCHW-in / blocked-out legalization
    (other inputs) gives them a blocked kernel too. A
    per-channel constant add / multiply and a sigmoid right after the slice move before it
    (constants zero-padded), so they stay in the blocked layout as well."""

    @tvm.transform.module_pass(opt_level=0, name="PadConvOutputChannels")
    def run(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        mutator = _PadOutputChannels(mod, block)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        # a slice that moved below the bias / activation leaves the first one unused
        return relax.transform.DeadCodeElimination()(mutator.builder_.get())

    return run


@expr_functor.mutator
class _FoldConstantTransforms(expr_functor.PyExprMutator):
    def _constant(self, expr: relax.Expr) -> Constant | None:
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            expr = expr if bound is None else bound
        return expr if isinstance(expr, Constant) else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name not in ("relax.layout_transform", "relax.reshape") or not call.args:
            return call
        source = self._constant(call.args[0])
        if source is None:
            return call
        array = source.value.numpy()
        if name == "relax.reshape":
            shape = getattr(call.ty, "shape", None)
            try:
                dims = [int(d) for d in shape]  # type: ignore[union-attr]
            except (TypeError, ValueError):
                return call
            return relax.const(array.reshape(dims))
        if call.attrs.pad_value is not None:
            return call
        transformed = apply_index_map(call.attrs.index_map, array)
        return call if transformed is None else relax.const(transformed)


def apply_index_map(index_map: Any, array: np.ndarray) -> np.ndarray | None:
    """``array`` laid out by a TIR ``IndexMap`` of +, -, *, //, % and constants, in numpy (TVM's
    ``map_tensor`` took ~0.5 s per weight). None when the map uses anything else."""
    from tvm import tirx

    positions = dict(zip(index_map.initial_indices, np.indices(array.shape), strict=True))
    operators = {
        tirx.Add: np.add,
        tirx.Sub: np.subtract,
        tirx.Mul: np.multiply,
        tirx.FloorDiv: np.floor_divide,
        tirx.FloorMod: np.mod,
    }

    def evaluate(expr: Any) -> Any:
        if isinstance(expr, tirx.Var):
            return positions[expr]
        if isinstance(expr, tirx.IntImm):
            return int(expr.value)
        for kind, operator in operators.items():
            if isinstance(expr, kind):
                return operator(evaluate(expr.a), evaluate(expr.b))
        raise _UnsupportedIndex

    try:
        targets = tuple(np.broadcast_to(evaluate(e), array.shape) for e in index_map.final_indices)
    except _UnsupportedIndex:
        return None
    shape = tuple(int(d) for d in index_map.map_shape(list(array.shape)))
    result = np.zeros(shape, dtype=array.dtype)
    result[targets] = array
    return result


class _UnsupportedIndex(Exception):
    pass


def fold_constant_layout_transforms() -> tvm.transform.Pass:
    """``layout_transform(constant)`` and ``reshape(constant)`` → the constant, computed on the
    host (FoldConstant compiles and runs one TIR function per call: ~10 s for yolov5n's biases)."""

    @tvm.transform.module_pass(opt_level=0, name="FoldConstantLayoutTransforms")
    def run(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        mutator = _FoldConstantTransforms(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.get()

    return run


def _dtype_or_none(dtype: Any) -> str | None:
    text = "" if dtype is None else str(dtype)
    return None if text in ("", "None", "void") else text


_MOVEMENT_OPS = ("relax.reshape", "relax.permute_dims")
_HOISTED_ACTIVATIONS = ("relax.sigmoid",)


@expr_functor.mutator
class _HoistActivations(expr_functor.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") not in _HOISTED_ACTIVATIONS:
            return call
        moves: list[relax.Call] = []
        source = call.args[0]
        while isinstance(source, relax.Var):
            bound = self.lookup_binding(source)
            if not isinstance(bound, relax.Call) or getattr(bound.op, "name", "") not in (
                _MOVEMENT_OPS
            ):
                break
            moves.append(bound)
            source = bound.args[0]
        if not moves:
            return call
        value = self.builder_.emit(relax.Call(call.op, [source], call.attrs, call.ty_args))
        for move in reversed(moves):
            value = self.builder_.emit(
                relax.Call(move.op, [value, *move.args[1:]], move.attrs, move.ty_args)
            )
        return value


def hoist_activations() -> tvm.transform.Pass:
    """``sigmoid(transpose(reshape(x)))`` → ``transpose(reshape(sigmoid(x)))``.

    An elementwise activation commutes with pure data movement; applied before the movement it
    directly follows its convolution, fuses into the convolution's epilogue and runs vectorised
    on the register tile. In YOLO's decode head it otherwise lands in one large injective
    function with the split/concat bookkeeping (18 ms of 170 here).
    """

    @tvm.transform.module_pass(opt_level=0, name="HoistActivations")
    def run(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        mutator = _HoistActivations(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return relax.transform.DeadCodeElimination()(mutator.builder_.get())

    return run


def _ndim(expr: relax.Expr) -> int | None:
    ty = getattr(expr, "ty", None)
    return int(ty.ndim) if isinstance(ty, relax.TensorType) else None


@expr_functor.mutator
class _KeepResizeBlocked(expr_functor.PyExprMutator):
    """See :func:`keep_resize_and_concat_blocked`."""

    def __init__(self, mod: tvm.IRModule, block: int) -> None:
        super().__init__(mod)
        self.block = block
        self.layout_transform = tvm.ir.Op.get("relax.layout_transform")
        self.resize = tvm.ir.Op.get("relax.image.resize2d")
        self.concat = tvm.ir.Op.get("relax.concat")

    def _bound(self, expr: relax.Expr) -> relax.Expr:
        """What ``expr`` is bound to, through aliases (``a = b``)."""
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is None:
                return expr
            expr = bound
        return expr

    def _blocked_source(self, expr: relax.Expr) -> relax.Expr | None:
        """``x`` when ``expr`` is the plain conversion of a blocked ``x`` (no padding)."""
        call = self._bound(expr)
        if not (
            isinstance(call, relax.Call)
            and call.op.same_as(self.layout_transform)
            and call.attrs.pad_value is None
            and _ndim(call.args[0]) == 5
            and _ndim(call) == 4
        ):
            return None
        source = call.args[0]
        shape = [int(d) for d in source.ty.shape]
        return source if shape[4] == self.block else None

    def _unblock(self, blocked: relax.Expr) -> relax.Expr:
        return self.builder_.emit(
            relax.op.layout_transform(
                blocked, index_map=lambda n, cb, h, w, c: (n, cb * self.block + c, h, w)
            )
        )

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.builder_.normalize(super().visit_call_(call))
        if call.op.same_as(self.resize) and call.attrs.layout == "NCHW":
            source = self._blocked_source(call.args[0])
            if source is None:
                return call
            attrs = call.attrs
            resized = self.builder_.emit(
                relax.op.image.resize2d(
                    source,
                    call.args[1],
                    roi=[float(v) for v in attrs.roi],
                    layout=f"NCHW{self.block}c",
                    method=attrs.method,
                    coordinate_transformation_mode=attrs.coordinate_transformation_mode,
                    rounding_method=attrs.rounding_method,
                    cubic_alpha=float(attrs.cubic_alpha),
                    cubic_exclude=int(attrs.cubic_exclude),
                    extrapolation_value=float(attrs.extrapolation_value),
                    out_dtype=_dtype_or_none(attrs.out_dtype),
                )
            )
            return self._unblock(resized)
        if call.op.same_as(self.layout_transform) and _ndim(call) == 5 and _ndim(call.args[0]) == 4:
            concat = self._bound(call.args[0])
            if not (
                isinstance(concat, relax.Call)
                and concat.op.same_as(self.concat)
                and int(concat.attrs.axis) == 1
            ):
                return call
            fields = self._bound(concat.args[0])
            if not isinstance(fields, relax.Tuple):
                return call
            sources = [self._blocked_source(field) for field in fields.fields]
            if any(source is None for source in sources):
                return call
            # whole blocks on both sides: the blocked concat is the same tensor, re-blocked
            expected = [int(d) for d in call.ty.shape]
            if expected[4] != self.block:
                return call
            return relax.op.concat(sources, axis=1)
        return call


def keep_resize_and_concat_blocked(block: int) -> tvm.transform.Pass:
    """Resize and concatenate in the blocked layout, where ConvertLayout leaves them in NCHW.

    TVM's layout inference keeps an NCHW16c resize2d in NCHW, so a YOLO neck's upsample +
    concat ran as ``unblock → resize → unblock → concat → block`` (1.7 ms per upsample in
    yolov5n, measured against OpenVINO). Run after ConvertLayout: ``resize(unblock(x))``
    becomes ``unblock(resize_blocked(x))`` (resize is per-channel), and a channel concat of
    unblocked tensors that is blocked again becomes the concat of the blocked tensors (each
    holds whole blocks). What no longer has a consumer is removed.
    """

    @tvm.transform.module_pass(opt_level=0, name="KeepResizeAndConcatBlocked")
    def run(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        mutator = _KeepResizeBlocked(mod, block)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return relax.transform.DeadCodeElimination()(mutator.builder_.get())

    return run


def legalize_conv2d(block: int) -> Callable[[relax.BlockBuilder, relax.Call], relax.Expr]:
    """The ``relax.nn.conv2d`` legalization for channel block ``block``.

    * NCHW{b}c data with OIHW{b}i{b}o kernel → :func:`conv2d_nchwc`;
    * NCHW data whose channels are not whole blocks, constant OIHW kernel with whole-block
      outputs → blocked output plus conversion back to NCHW, one function;
    * anything else → TVM's own legalization (a layout it cannot lower becomes NCHW around it).
    """
    data_blocked, kernel_blocked = blocked_layouts(block)
    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        data_layout, kernel_layout, out_layout, groups = _conv_attrs(call)
        attrs = call.attrs
        out_dtype = _dtype_or_none(attrs.out_dtype)
        options = {
            "strides": [int(s) for s in attrs.strides],
            "padding": [int(p) for p in attrs.padding],
            "dilation": [int(d) for d in attrs.dilation],
            "out_dtype": out_dtype,
        }
        data, weight = call.args
        if (data_layout, kernel_layout, out_layout, groups) == (
            data_blocked,
            kernel_blocked,
            data_blocked,
            1,
        ):
            return bb.call_te(conv2d_nchwc, data, weight, primfunc_name_hint="conv2d", **options)
        if (
            (data_layout, kernel_layout, out_layout, groups) == ("NCHW", "OIHW", "NCHW", 1)
            and isinstance(weight, Constant)
            and int(weight.value.shape[0]) % block == 0
        ):
            out_channels = int(weight.value.shape[0])
            packed = relax.const(pack_kernel(weight.value.numpy(), 1, block))

            def blocked_then_nchw(d: Any, k: Any) -> Any:
                return blocked_to_nchw(conv2d_nchwc(d, k, **options), out_channels)

            return bb.call_te(blocked_then_nchw, data, packed, primfunc_name_hint="conv2d")
        if (data_layout, kernel_layout, out_layout) == (data_blocked, kernel_blocked, data_blocked):
            return bb.call_te(
                _grouped_via_nchw,
                data,
                weight,
                groups=groups,
                primfunc_name_hint="conv2d",
                **options,
            )
        return default(bb, call)

    return legalize


def _grouped_via_nchw(
    data: te.Tensor,
    weight: te.Tensor,
    strides: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: str | None,
) -> te.Tensor:
    """A blocked grouped convolution (no template yet): unblock, TOPI's NCHW conv, reblock."""
    batch, in_blocks, height, width, block = (int(d) for d in data.shape)
    out_blocks, kernel_in_blocks, kernel_h, kernel_w, kernel_in, kernel_out = (
        int(d) for d in weight.shape
    )
    plain = te.compute(
        (batch, in_blocks * block, height, width),
        lambda n, c, h, w: data[n, c // block, h, w, c % block],
        name="to_nchw",
    )
    plain_weight = te.compute(
        (out_blocks * kernel_out, kernel_in_blocks * kernel_in, kernel_h, kernel_w),
        lambda o, i, y, x: weight[
            o // kernel_out, i // kernel_in, y, x, i % kernel_in, o % kernel_out
        ],
        name="kernel_oihw",
    )
    out = topi.nn.conv(
        plain, plain_weight, strides, padding, dilation, groups, "NCHW", "OIHW", out_dtype
    )
    _, channels, out_h, out_w = (int(d) for d in out.shape)
    return te.compute(
        (batch, channels // block, out_h, out_w, block),
        lambda n, cb, h, w, c: out[n, cb * block + c, h, w],
        name="to_blocked",
    )


#: name hint of the PrimFuncs :func:`legalize_layout_transform` makes (into blocks / out of them)
LAYOUT_TRANSFORM_NAME = "layout_transform"
UNBLOCK_NAME = "unblock"
#: TVM's OpPatternKind values
_ELEMWISE = 0


def legalize_layout_transform(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """A padding-free layout transform as a *gather* (each output element reads its source).

    TVM's own lowering scatters (loops over the source), which its op-pattern analysis calls
    opaque, so FuseOps never fuses it: every NCHW <-> NCHW16c conversion at a graph boundary was
    a separate pass over memory. A gather is an injective block the convolution template inlines
    into its epilogue.
    """
    default = tvm.ir.Op.get("relax.layout_transform").get_attr("FLegalize")
    if call.attrs.pad_value is not None:
        return default(bb, call)
    index_map = call.attrs.index_map
    source_shape = [int(d) for d in call.args[0].ty.shape]
    try:
        inverse = index_map.inverse(source_shape)
    except Exception:  # not bijective on this shape
        return default(bb, call)
    out_shape = [int(d) for d in index_map.map_shape(source_shape)]
    # Back from blocks to a plain layout: not fused into a convolution's epilogue (see
    # mark_layout_transforms_elementwise), so it gets its own name.
    name = LAYOUT_TRANSFORM_NAME if len(out_shape) >= len(source_shape) else UNBLOCK_NAME

    def gather(data: te.Tensor) -> te.Tensor:
        return te.compute(
            out_shape,
            lambda *indices: data[tuple(inverse.map_indices(list(indices)))],
            name="layout_transform",
        )

    return bb.call_te(gather, call.args[0], primfunc_name_hint=name)


def mark_layout_transforms_elementwise() -> tvm.transform.Pass:
    """Let FuseOps fuse :func:`legalize_layout_transform`'s gathers *into* blocks into a
    convolution's epilogue (it fuses only elementwise and broadcast ops there). Run after
    AnnotateTIROpPattern.

    Conversions *out of* blocks stay injective: in a convolution's epilogue they turn each
    register tile of 16 channels into short runs along W through a gather (yolov5n's 255-channel
    head convolution at 80×80: 2.47 ms against 1.60 ms blocked), and the data movement that
    usually follows (YOLO's reshape + transpose) fuses with them into one pass instead."""

    @tvm.transform.module_pass(opt_level=0, name="MarkLayoutTransformsElementwise")
    def run(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        updated = tvm.IRModule(mod.functions, attrs=mod.attrs)
        for gvar, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and gvar.name_hint.startswith(
                LAYOUT_TRANSFORM_NAME
            ):
                updated[gvar] = func.with_attr("op_pattern", _ELEMWISE)
        return updated

    return run


def legalize_map(block: int) -> dict[str, Callable[[relax.BlockBuilder, relax.Call], relax.Expr]]:
    """``customize_legalize_map`` for LegalizeOps on a blocked CPU target."""
    return {
        "relax.nn.conv2d": legalize_conv2d(block),
        "relax.sigmoid": legalize_sigmoid,
        "relax.layout_transform": legalize_layout_transform,
    }


def blocked_layout_passes(block: int) -> list[tvm.transform.Pass]:
    """The Relax passes from a freshly imported (params bound) module to fused TIR, blocked."""
    data_layout, kernel_layout = blocked_layouts(block)
    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        fold_constant_layout_transforms(),
        hoist_activations(),
        pad_output_channels(block),
        relax.transform.ConvertLayout({"relax.nn.conv2d": [data_layout, kernel_layout]}),
        # ConvertLayout converts a tensor once per consumer; one conversion can fuse upstream.
        relax.transform.EliminateCommonSubexpr(),
        keep_resize_and_concat_blocked(block),
        relax.transform.EliminateCommonSubexpr(),
        fold_constant_layout_transforms(),
        relax.transform.LegalizeOps(customize_legalize_map=legalize_map(block)),
        relax.transform.AnnotateTIROpPattern(),
        mark_layout_transforms_elementwise(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
