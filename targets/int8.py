"""Real int8 execution of QDQ convolutions: a Relax pass for a CPU target's legalize phase.

TVM's ONNX importer turns QuantizeLinear / DequantizeLinear into ``relax.quantize`` /
``relax.dequantize``, which LegalizeOps lowers to float arithmetic: a QDQ model then runs in
float, slower than the float model. This pass finds the QDQ convolution pattern onnxruntime
fuses into ``QLinearConv``::

    dequantize(x_q) ─┐
    dequantize(W_q) ─┴─ conv2d ─ [add(bias)] ─ [relu] ─ quantize(y_scale, y_zp) → y_q

(``bias`` = ``reshape(dequantize(B_q int32))`` or a float constant) and replaces the whole chain
by one call to the int8 kernel of :mod:`detc.kernels.conv2d_int8` (u8/s8 × s8 → s32 with
``vpdpbusd``, zero points and bias folded, requantization fused), producing ``y_q`` directly.
The dequantize of ``y_q`` that follows stays: operators between quantized convolutions (SiLU's
sigmoid and mul, concat, resize, ...) keep running in float on dequantized values, as the QDQ
graph says.

By default it fires only where the result equals onnxruntime's integer ``QLinearConv`` bit for
bit (checked in tests/test_int8_lowering.py against onnxruntime with graph optimizations on):

* activations (input and output) quantized per tensor, uint8 or int8, constant scale/zero point;
* weights int8, constant, per output channel or per tensor, zero point 0;
* no bias, or an int32 bias whose scale is ``x_scale * w_scale`` (what quantizers write);
* groups 1, NCHW/OIHW, every intermediate used only by the next step of the chain.

``allow_approximate=True`` also lowers chains onnxruntime computes in *float* (it does not fuse
them into QLinearConv): a float bias (quantized to ``x_scale * w_scale``, round half to even), an
int32 bias of another scale (rescaled), a ReLU between the convolution and the quantize (a clamp
at the output zero point). Those differ from onnxruntime by at most 1 in a few outputs, where the
float result sits at a rounding boundary.

``float_outputs=True`` also lowers a dequantized convolution whose float result is *not*
quantized (DQ → Conv [→ bias] → float, what detc's ``quantize`` pass writes by default): the
kernel sums the integer products exactly and dequantizes, ``float(Σ + bias_q) · x_scale·w_scale``
(a float bias is added after). onnxruntime computes such a graph in float; results agree to
float rounding (~1e-7 relative; tests use the fp32 tolerance rtol 1e-4 / atol 1e-5).

Everything else (float convolutions, depthwise/grouped convolutions, per-channel activation
scales, non-constant weights; and by default a dequantized convolution whose output is not
quantized) is left as it is for the float path; :func:`explain_int8_lowering` says why for each
candidate.

Weights must be constants: run it after ``BindParams`` (:func:`bind_quantization_params`), and
*before* FoldConstant (which folds ``dequantize(W_q)`` into a float weight and hides the
pattern) and LegalizeOps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax import expr_functor

from detc.kernels.conv2d_int8 import QuantizedConv2d
from detc.kernels.conv2d_int8_arm import build_conv2d_int8_for_target, is_aarch64
from detc.kernels.int8_tiles import TileChooser
from detc.targets.tuning.database import default_database_dir
from detc.targets.tuning.options import TuningOptions
from detc.targets.tuning.tiles import tile_chooser

logger = logging.getLogger("detc.targets")

_QUANTIZE = "relax.quantize"
_DEQUANTIZE = "relax.dequantize"
_CONV2D = "relax.nn.conv2d"
_ADD = "relax.add"
_RELU = "relax.nn.relu"
_SIGMOID = "relax.sigmoid"
_MULTIPLY = "relax.multiply"
#: operators that only move values: an elementwise activation after them commutes with them
_LAYOUT_OPS = ("relax.reshape", "relax.permute_dims")
_RESHAPE = "relax.reshape"
_ACTIVATION_DTYPES = ("uint8", "int8")
#: share of a --tune-minutes budget the int8 tile search may take (the float kernels' search
#: gets what it leaves)
INT8_TILE_BUDGET_SHARE = 0.5
#: how far a quantized bias's scale may be from x_scale * w_scale (float32 rounding of the
#: product, computed in float64 or float32 by the quantizer) and still be taken as is
_BIAS_SCALE_RTOL = 1e-5


@dataclass(frozen=True)
class NoMatch:
    """Why a ``quantize`` is not the end of a lowerable QDQ convolution."""

    reason: str


@dataclass(frozen=True)
class QdqConv2d:
    """A matched chain: the quantized input expression and the convolution's numbers."""

    data: relax.Expr  # x_q, uint8 or int8 NCHW
    conv: QuantizedConv2d
    #: False when onnxruntime computes the chain in float (float or rescaled bias, ReLU)
    exact: bool
    #: layout calls (reshape, permute_dims) the graph applied between the convolution and the
    #: activation the kernel took over; they are re-applied to the kernel's output
    then: tuple[relax.Call, ...] = ()


@dataclass(frozen=True)
class Int8Decision:
    """One ``quantize`` the pass looked at: lowered, or the reason it was not."""

    output: str  # name of the quantize's variable
    lowered: bool
    reason: str


def _op_name(expr: Any) -> str:
    return str(getattr(getattr(expr, "op", None), "name", ""))


def _dtype(expr: relax.Expr) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def _shape(expr: relax.Expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    try:
        return tuple(int(d) for d in shape)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def _var_args(value: relax.Expr) -> list[relax.Var]:
    """The variables a bound value reads directly (through tuples too)."""
    pending = list(getattr(value, "args", None) or getattr(value, "fields", None) or [])
    found = []
    while pending:
        item = pending.pop()
        if isinstance(item, relax.Var):
            found.append(item)
        elif isinstance(item, relax.Tuple):
            pending.extend(item.fields)
    return found


@expr_functor.visitor
class _CollectBindings(expr_functor.PyExprVisitor):
    def __init__(self, graph: _Graph) -> None:
        super().__init__()
        self.graph = graph

    def visit_var_binding_(self, binding: Any) -> None:
        self.graph.bound[binding.var] = binding.value
        for arg in _var_args(binding.value):
            self.graph.consumers.setdefault(arg, []).append(binding.var)
        self.visit_expr(binding.value)

    def visit_var_(self, var: relax.Var) -> None:
        self.graph.uses[var] = self.graph.uses.get(var, 0) + 1

    def visit_dataflow_var_(self, var: relax.Var) -> None:
        self.graph.uses[var] = self.graph.uses.get(var, 0) + 1


class _Graph:
    """The bindings and use counts of one Relax function (the *original*, never mutated)."""

    def __init__(self, func: relax.Function) -> None:
        self.bound: dict[relax.Var, relax.Expr] = {}
        self.uses: dict[relax.Var, int] = {}
        self.consumers: dict[relax.Var, list[relax.Var]] = {}
        _CollectBindings(self).visit_expr(func)

    def value(self, expr: relax.Expr) -> relax.Expr:
        """Follow variables to the expression bound to them."""
        while isinstance(expr, relax.Var) and expr in self.bound:
            expr = self.bound[expr]
        return expr

    def constant(self, expr: relax.Expr) -> np.ndarray | None:
        value = self.value(expr)
        if isinstance(value, Constant):
            return np.asarray(value.value.numpy())
        if _op_name(value) == _RESHAPE:
            source = self.constant(value.args[0])
            shape = _shape(value)
            if source is not None and shape is not None:
                return source.reshape(shape)
        return None

    def used_once(self, expr: relax.Expr) -> bool:
        return not isinstance(expr, relax.Var) or self.uses.get(expr, 0) <= 1


def _match_silu(graph: _Graph, expr: relax.Expr) -> relax.Var | None:
    """``v`` when ``expr`` is ``multiply(v, sigmoid(v))`` (either order) and ``v`` and the
    sigmoid have no other readers: the kernel can then apply SiLU in its epilogue."""
    value = graph.value(expr)
    if _op_name(value) != _MULTIPLY or not isinstance(expr, relax.Var):
        return None
    for pre, gate in (value.args, value.args[::-1]):
        if not (isinstance(pre, relax.Var) and isinstance(gate, relax.Var)):
            continue
        gate_value = graph.value(gate)
        if _op_name(gate_value) != _SIGMOID or not gate_value.args[0].same_as(pre):
            continue
        pre_readers = graph.consumers.get(pre, [])
        gate_readers = graph.consumers.get(gate, [])
        only_silu_reads_pre = len(pre_readers) == 2 and all(
            any(r.same_as(v) for r in pre_readers) for v in (gate, expr)
        )
        if only_silu_reads_pre and len(gate_readers) == 1 and gate_readers[0].same_as(expr):
            return pre
    return None


def _silu_reader(graph: _Graph, pre: relax.Var) -> relax.Var | None:
    """The ``multiply`` that applies SiLU to ``pre`` (its only readers), if there is one."""
    for reader in graph.consumers.get(pre, []):
        if _op_name(graph.value(reader)) != _MULTIPLY:
            continue
        silu_input = _match_silu(graph, reader)
        if silu_input is not None and silu_input.same_as(pre):
            return reader
    return None


def _sigmoid_after_layout(
    graph: _Graph, pre: relax.Var
) -> tuple[relax.Var, list[relax.Var]] | None:
    """``(sigmoid, layout vars)`` when ``pre`` is read only by a chain of reshapes /
    transposes ending in a sigmoid (a YOLO head: conv → reshape → transpose → sigmoid). The
    sigmoid commutes with them, so the kernel can apply it to its tile, where it vectorises;
    after the transpose it cost 8 ms on yolov5n's 80×80 head, 8x the data movement alone."""
    path: list[relax.Var] = []
    current = pre
    while True:
        readers = graph.consumers.get(current, [])
        if len(readers) != 1 or not graph.used_once(current):
            return None
        reader = readers[0]
        op = _op_name(graph.value(reader))
        if op == _SIGMOID:
            return reader, path
        if op not in _LAYOUT_OPS or not graph.value(reader).args[0].same_as(current):
            return None
        path.append(reader)
        current = reader


def _scalar(array: np.ndarray | None) -> float | None:
    return None if array is None or array.size != 1 else array.reshape(()).item()


def _match_dequantize_activation(
    graph: _Graph, expr: relax.Expr
) -> tuple[relax.Expr, float, int] | NoMatch:
    call = graph.value(expr)
    if _op_name(call) != _DEQUANTIZE:
        return NoMatch("the convolution's input is not a dequantize (a float convolution)")
    data, scale_expr, zero_expr = call.args
    if _dtype(data) not in _ACTIVATION_DTYPES:
        return NoMatch(f"the input is dequantized from {_dtype(data)}, not uint8/int8")
    scale, zero = graph.constant(scale_expr), graph.constant(zero_expr)
    if scale is None or zero is None:
        return NoMatch("the input's scale or zero point is not a constant")
    if scale.size != 1 or zero.size != 1:
        return NoMatch("the input is quantized per channel (only per-tensor activations)")
    return data, float(np.float32(_scalar(scale))), int(_scalar(zero) or 0)


def _match_dequantize_weight(
    graph: _Graph, expr: relax.Expr, out_channels: int
) -> tuple[np.ndarray, np.ndarray] | NoMatch:
    call = graph.value(expr)
    if _op_name(call) != _DEQUANTIZE:
        return NoMatch("the weight is not dequantized (float weights)")
    weight = graph.constant(call.args[0])
    scale = graph.constant(call.args[1])
    zero = graph.constant(call.args[2])
    if weight is None or scale is None or zero is None:
        return NoMatch("the weight, its scale or zero point is not a constant (bind params first)")
    if weight.dtype != np.int8:
        return NoMatch(f"the weight is {weight.dtype}, not int8")
    if np.any(zero != 0):
        return NoMatch("the weight zero point is not 0 (asymmetric weights)")
    if scale.size not in (1, out_channels) or (scale.size > 1 and int(call.attrs.axis) != 0):
        return NoMatch("the weight scale is neither per tensor nor per output channel")
    per_channel = np.broadcast_to(scale.reshape(-1).astype(np.float32), (out_channels,))
    return weight, np.ascontiguousarray(per_channel)


def _channel_vector(array: np.ndarray, out_channels: int) -> np.ndarray | None:
    """A per-channel operand of an NCHW add: shape (1, C, 1, 1) or (C, 1, 1)."""
    if array.shape in ((1, out_channels, 1, 1), (out_channels, 1, 1)):
        return array.reshape(out_channels)
    return None


@dataclass(frozen=True)
class _Bias:
    """A per-channel bias: int32 in accumulator units when it was quantized to exactly
    ``x_scale * w_scale`` (what quantizers write), and its float value in any case."""

    quantized: np.ndarray | None  # int32 [OC]
    values: np.ndarray  # float32 [OC]


def _match_bias(
    graph: _Graph, expr: relax.Expr, out_channels: int, accumulator_scale: np.ndarray
) -> _Bias | NoMatch:
    value = graph.value(expr)
    if _op_name(value) == _RESHAPE and _op_name(graph.value(value.args[0])) == _DEQUANTIZE:
        shape = _shape(value)
        if shape not in ((1, out_channels, 1, 1), (out_channels, 1, 1)):
            return NoMatch("the added tensor is not a per-channel bias")
        dequantize = graph.value(value.args[0])
        quantized, scale, zero = (graph.constant(a) for a in dequantize.args)
        if quantized is None or scale is None or zero is None:
            return NoMatch("the bias is not a constant")
        if quantized.dtype != np.int32 or np.any(zero != 0) or quantized.size != out_channels:
            return NoMatch("the bias is not int32 per channel with zero point 0")
        bias_scale = np.broadcast_to(scale.reshape(-1), (out_channels,)).astype(np.float32)
        as_float = (quantized.reshape(out_channels).astype(np.float32) * bias_scale).astype(
            np.float32
        )
        if np.allclose(bias_scale, accumulator_scale, rtol=_BIAS_SCALE_RTOL, atol=0):
            return _Bias(quantized.reshape(out_channels).astype(np.int32), as_float)
        return _Bias(None, as_float)
    array = graph.constant(expr)
    if array is None:
        return NoMatch("the added tensor is not a constant bias")
    if array.dtype != np.float32:
        return NoMatch(f"the bias is {array.dtype}")
    vector = _channel_vector(array, out_channels)
    if vector is None:
        return NoMatch("the added tensor is not a per-channel bias")
    return _Bias(None, vector.astype(np.float32))


def _to_int32(values: np.ndarray) -> np.ndarray:
    return np.clip(values, -(2**31), 2**31 - 1).astype(np.int32)


@dataclass(frozen=True)
class _Chain:
    """dequantize(x_q), dequantize(W_q) → conv2d [→ add(bias)], in float."""

    data: relax.Expr
    input_scale: float
    input_zero_point: int
    weight: np.ndarray
    weight_scale: np.ndarray
    bias: _Bias | None
    attrs: Any

    def accumulator_scale(self) -> np.ndarray:
        return (np.float32(self.input_scale) * self.weight_scale).astype(np.float32)

    def conv(self, **output: Any) -> QuantizedConv2d:
        return QuantizedConv2d(
            weight=self.weight,
            weight_scale=self.weight_scale,
            input_scale=self.input_scale,
            input_zero_point=self.input_zero_point,
            input_dtype=_dtype(self.data),
            strides=(int(self.attrs.strides[0]), int(self.attrs.strides[1])),
            padding=tuple(int(p) for p in self.attrs.padding),
            dilation=(int(self.attrs.dilation[0]), int(self.attrs.dilation[1])),
            **output,
        )


def _match_chain(graph: _Graph, end: relax.Expr) -> _Chain | NoMatch:
    """Whether ``end`` is the float result of a dequantized convolution (with its bias)."""
    value = graph.value(end)
    bias_expr = None
    source = end
    if _op_name(value) == _ADD:
        left, right = value.args
        if _op_name(graph.value(left)) == _CONV2D:
            source, bias_expr = left, right
        elif _op_name(graph.value(right)) == _CONV2D:
            source, bias_expr = right, left
        else:
            return NoMatch("the value is an add of no convolution")
        value = graph.value(source)
        if not graph.used_once(source):
            return NoMatch("the convolution's result has other users")
    if _op_name(value) != _CONV2D:
        return NoMatch("the quantized value does not come from a convolution")

    attrs = value.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    if layouts != ("NCHW", "OIHW", "NCHW"):
        return NoMatch(f"layouts {layouts}, not NCHW/OIHW")
    if int(attrs.groups) != 1:
        return NoMatch(f"groups={int(attrs.groups)} (grouped/depthwise: float path)")
    if _dtype(value) != "float32":
        return NoMatch(f"the convolution computes in {_dtype(value)}, not float32")
    weight_shape = _shape(value.args[1])
    if weight_shape is None or len(weight_shape) != 4:
        return NoMatch("the weight shape is not static")
    out_channels = weight_shape[0]

    data = _match_dequantize_activation(graph, value.args[0])
    if isinstance(data, NoMatch):
        return data
    data_expr, x_scale, x_zero = data
    if _shape(data_expr) is None:
        return NoMatch("the input shape is not static")
    weight = _match_dequantize_weight(graph, value.args[1], out_channels)
    if isinstance(weight, NoMatch):
        return weight
    weight_q, weight_scale = weight
    chain = _Chain(data_expr, x_scale, x_zero, weight_q, weight_scale, None, attrs)
    if bias_expr is None:
        return chain
    bias = _match_bias(graph, bias_expr, out_channels, chain.accumulator_scale())
    if isinstance(bias, NoMatch):
        return bias
    return _Chain(data_expr, x_scale, x_zero, weight_q, weight_scale, bias, attrs)


def _match_qdq_conv2d(graph: _Graph, quantize: relax.Call) -> QdqConv2d | NoMatch:
    """Whether ``quantize`` ends a lowerable QDQ convolution chain (pure: changes nothing)."""
    if _op_name(quantize) != _QUANTIZE:
        return NoMatch("not a quantize")
    out_dtype = str(quantize.attrs.out_dtype)
    if out_dtype not in _ACTIVATION_DTYPES:
        return NoMatch(f"quantizes to {out_dtype}, not uint8/int8")
    y_scale = _scalar(graph.constant(quantize.args[1]))
    y_zero = _scalar(graph.constant(quantize.args[2]))
    if y_scale is None or y_zero is None:
        return NoMatch("the output is quantized per channel or with non-constant parameters")

    source = quantize.args[0]
    relu = False
    activation = None
    if _op_name(graph.value(source)) == _RELU:
        if not graph.used_once(source):
            return NoMatch("the relu's result has other users")
        relu, source = True, graph.value(source).args[0]
    if not graph.used_once(source):
        return NoMatch("the quantized value has other users")
    silu_input = None if relu else _match_silu(graph, source)
    if silu_input is not None:
        activation, source = "silu", silu_input
    chain = _match_chain(graph, source)
    if isinstance(chain, NoMatch):
        return chain

    # A bias is exact in the accumulator only when quantized to x_scale * w_scale; onnxruntime
    # runs any other bias, and a ReLU or SiLU before the quantize, in float (no QLinearConv
    # fusion).
    exact = not relu and activation is None
    bias = None
    if chain.bias is not None:
        if chain.bias.quantized is not None:
            bias = chain.bias.quantized
        else:
            exact = False
            bias = _to_int32(np.rint(chain.bias.values / chain.accumulator_scale()))
    conv = chain.conv(
        bias=bias,
        output_scale=float(np.float32(y_scale)),
        output_zero_point=int(y_zero),
        output_dtype=out_dtype,
        relu=relu,
        activation=activation,
    )
    if not conv.accumulator_fits_int32():
        return NoMatch("the int32 accumulator could overflow (huge weights or bias)")
    return QdqConv2d(data=chain.data, conv=conv, exact=exact)


def _match_float_output(graph: _Graph, end: relax.Var) -> QdqConv2d | NoMatch:
    """A dequantized convolution whose float result is *not* quantized (the int8 kernel then
    dequantizes its exact int32 sum: float(Σ + bias_q) · x_scale·w_scale [+ float bias])."""
    chain = _match_chain(graph, end)
    if isinstance(chain, NoMatch):
        return chain
    bias = chain.bias.quantized if chain.bias is not None else None
    float_bias = chain.bias.values if chain.bias is not None and bias is None else None
    conv = chain.conv(
        bias=bias,
        float_bias=float_bias,
        output_scale=1.0,
        output_zero_point=0,
        output_dtype="float32",
    )
    if not conv.accumulator_fits_int32():
        return NoMatch("the int32 accumulator could overflow (huge weights or bias)")
    # onnxruntime computes this in float; the integer sum is exact, so the results differ by
    # float rounding only (~1e-7 relative).
    return QdqConv2d(data=chain.data, conv=conv, exact=False)


_APPROXIMATE_REASON = (
    "onnxruntime computes this chain in float (float bias, ReLU or SiLU before the quantize): "
    "lowered only with allow_approximate (±1 LSB)"
)
_FLOAT_OUTPUT_REASON = "float output: int8 products, exact int32 sum, dequantized in the kernel"


def _quantized_source(graph: _Graph, quantize: relax.Call) -> relax.Expr:
    source = quantize.args[0]
    value = graph.value(source)
    if _op_name(value) == _RELU:
        return value.args[0]
    silu_input = _match_silu(graph, source)
    return source if silu_input is None else silu_input


def _plan(
    graph: _Graph, allow_approximate: bool, float_outputs: bool
) -> tuple[dict[relax.Call, QdqConv2d], list[Int8Decision]]:
    """What to lower in one function: the call each kernel replaces (a ``quantize``, or with
    ``float_outputs`` the bias add / convolution ending a dequantized chain), and a decision
    for every candidate."""
    plan: dict[relax.Call, QdqConv2d] = {}
    decisions = []
    taken: set[relax.Expr] = set()
    for var, value in graph.bound.items():
        if _op_name(value) != _QUANTIZE:
            continue
        matched = _match_qdq_conv2d(graph, value)
        if isinstance(matched, NoMatch):
            decisions.append(Int8Decision(var.name, False, matched.reason))
        elif matched.exact or allow_approximate:
            plan[value] = matched
            taken.add(_quantized_source(graph, value))
            reason = "bit-exact with QLinearConv" if matched.exact else "approximate (allowed)"
            decisions.append(Int8Decision(var.name, True, reason))
        else:
            decisions.append(Int8Decision(var.name, False, _APPROXIMATE_REASON))
    if not float_outputs:
        return plan, decisions
    for var, value in graph.bound.items():
        if _op_name(value) not in (_ADD, _CONV2D) or var in taken:
            continue
        readers = graph.consumers.get(var, [])
        read_by_bias_add = (
            _op_name(value) == _CONV2D
            and len(readers) == 1
            and not isinstance(_match_chain(graph, readers[0]), NoMatch)
        )
        if read_by_bias_add:
            continue  # the add ends the chain
        matched = _match_float_output(graph, var)
        if isinstance(matched, NoMatch):
            continue
        silu = _silu_reader(graph, var)
        sigmoid = None if silu is not None else _sigmoid_after_layout(graph, var)
        if silu is not None:
            # The kernel applies the SiLU too and replaces the multiply; the convolution and
            # the sigmoid become dead.
            with_silu = dataclasses.replace(matched.conv, activation="silu")
            plan[graph.bound[silu]] = QdqConv2d(matched.data, with_silu, exact=False)
            decisions.append(Int8Decision(var.name, True, _FLOAT_OUTPUT_REASON + ", SiLU fused"))
        elif sigmoid is not None:
            sigmoid_var, layout = sigmoid
            with_sigmoid = dataclasses.replace(matched.conv, activation="sigmoid")
            plan[graph.bound[sigmoid_var]] = QdqConv2d(
                matched.data, with_sigmoid, exact=False, then=tuple(graph.bound[v] for v in layout)
            )
            reason = _FLOAT_OUTPUT_REASON + ", sigmoid fused"
            decisions.append(Int8Decision(var.name, True, reason))
        else:
            plan[value] = matched
            decisions.append(Int8Decision(var.name, True, _FLOAT_OUTPUT_REASON))
    return plan, decisions


@expr_functor.mutator
class _LowerQdqConv2d(expr_functor.PyExprMutator):
    def __init__(
        self, mod: tvm.IRModule, target: tvm.target.Target, tiles: TileChooser | None
    ) -> None:
        super().__init__(mod)
        self.target = target
        self.tiles = tiles
        self.plan: dict[relax.Call, QdqConv2d] = {}
        self.lowered = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        matched = self.plan.get(call)
        if matched is None:
            return super().visit_call_(call)
        data = self.visit_expr(matched.data)
        data_shape = _shape(data) or ()
        tiles = None
        if self.tiles is not None and not is_aarch64(self.target):
            tiles = self.tiles(data_shape, matched.conv, self.target)
        kernel = build_conv2d_int8_for_target(data_shape, matched.conv, self.target, tiles)
        gvar = self.builder_.add_func(kernel.func, "conv2d_int8")
        constants = [relax.const(c) for c in kernel.constants]
        self.lowered += 1
        if kernel.func_data_shape is not None and kernel.func_out_shape is not None:
            # The kernel runs a 1x1 convolution on the image as one row. memory.view, not
            # reshape: a reshape would fuse into the float operators around the kernel and
            # turn them into new workloads the tuning database has never seen.
            flat = self.builder_.emit(relax.op.memory.view(data, kernel.func_data_shape))
            flat_type = relax.TensorType(kernel.func_out_shape, kernel.out_dtype)
            flat_out = self.builder_.emit(relax.call_tir(gvar, [flat, *constants], flat_type))
            result: relax.Expr = relax.op.memory.view(flat_out, kernel.out_shape)
        else:
            out_type = relax.TensorType(kernel.out_shape, kernel.out_dtype)
            result = relax.call_tir(gvar, [data, *constants], out_type)
        for layout_call in matched.then:
            moved = self.builder_.emit(result)
            result = relax.Call(layout_call.op, [moved, *layout_call.args[1:]], layout_call.attrs)
        return result


def lower_qdq_conv2d_to_int8(
    target: tvm.target.Target | None = None,
    *,
    allow_approximate: bool = False,
    float_outputs: bool = False,
    tiles: TileChooser | None = None,
) -> tvm.transform.Pass:
    """The pass: every lowerable QDQ convolution → one int8 kernel call (see the module doc).

    ``target`` picks the kernel variant (AVX512-VNNI, AVX-VNNI, plain AVX-512/AVX2); None means
    the current target (``with target:``), as in a target's legalize phase. By default only
    chains whose integer result equals onnxruntime's bit for bit are lowered;
    ``allow_approximate`` also lowers those onnxruntime computes in float (a float bias, a ReLU
    before the quantize), which then differ from it by at most 1 in a few outputs.
    ``float_outputs`` also lowers dequantized convolutions whose float result is not quantized
    (detc's ``quantize`` pass leaves conv outputs float by default): int8 products, the exact
    int32 sum, dequantized by the kernel; onnxruntime computes those in float, so results
    differ by float rounding (~1e-7 relative). ``tiles`` picks each x86 kernel's schedule
    (:func:`detc.targets.tuning.tiles.tile_chooser`: measured and remembered per workload);
    None, or a chooser answering None, means the kernel's default.
    """

    @tvm.transform.module_pass(opt_level=0, name="LowerQdqConv2dToInt8")
    def run(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        chosen = target if target is not None else tvm.target.Target.current(allow_none=False)
        mutator = _LowerQdqConv2d(mod, chosen, tiles)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.plan, _ = _plan(_Graph(func), allow_approximate, float_outputs)
                if mutator.plan:
                    mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        if not mutator.lowered:
            return mod
        logger.debug("int8 lowering: %d convolution(s)", mutator.lowered)
        return relax.transform.DeadCodeElimination()(mutator.builder_.get())

    return run


def explain_int8_lowering(
    mod: tvm.IRModule, *, allow_approximate: bool = False, float_outputs: bool = False
) -> list[Int8Decision]:
    """For every ``quantize`` in ``mod``'s Relax functions (and, with ``float_outputs``, every
    dequantized convolution it would lower): lowered, or why not. Changes nothing."""
    decisions = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            decisions.extend(_plan(_Graph(func), allow_approximate, float_outputs)[1])
    return decisions


def has_quantized_ops(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` holds any quantize (cheap test before binding params for the pass)."""
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function) and any(
            _op_name(v) == _QUANTIZE for v in _Graph(func).bound.values()
        ):
            return True
    return False


def bind_quantization_params(
    mod: tvm.IRModule, params: list[np.ndarray], num_inputs: int
) -> tuple[tvm.IRModule, list[np.ndarray]]:
    """Bind every parameter of ``main`` that a ``quantize``/``dequantize`` reads (quantized
    weights, scales, zero points, quantized biases) as a constant; returns the module and the
    parameters ``main`` still takes, in order (float weights of unquantized layers stay
    parameters, so the artifact's calling convention changes only by the bound ones)."""
    main = mod["main"]
    weights = list(main.params[num_inputs:])
    graph = _Graph(main)
    read: set[relax.Var] = set()
    for value in graph.bound.values():
        if _op_name(value) in (_QUANTIZE, _DEQUANTIZE):
            read.update(a for a in value.args if isinstance(a, relax.Var))
    bound = {var: tvm.runtime.tensor(array) for var, array in zip(weights, params, strict=True)}
    to_bind = {var: bound[var] for var in weights if var in read}
    if not to_bind:
        return mod, list(params)
    remaining = [array for var, array in zip(weights, params, strict=True) if var not in to_bind]
    return relax.transform.BindParams("main", to_bind)(mod), remaining


def int8_tile_chooser(
    tuning: TuningOptions | None,
    device: Any,
    on_search: Callable[[float], None] | None = None,
) -> TileChooser | None:
    """The schedule choice of a build with tuning options ``tuning`` (None for an untuned build:
    every kernel takes its default). The measured tiles live in the tuning database directory
    (``int8_tiles.jsonl``); ``tuning.tune`` measures the workloads the file lacks on ``device``
    (the target's), without it the file is only read; ``on_search`` hears the seconds each
    measurement took (they count against ``tuning.minutes``)."""
    if tuning is None:
        return None
    directory = tuning.database if tuning.database is not None else default_database_dir()
    deadline = math.inf
    if tuning.minutes is not None:
        deadline = time.monotonic() + tuning.minutes * 60 * INT8_TILE_BUDGET_SHARE
    return tile_chooser(
        Path(directory),
        search=bool(tuning.tune),
        device=device,
        deadline=deadline,
        on_search=on_search,
    )
