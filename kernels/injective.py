"""A fixed CPU schedule for functions without a convolution: concatenations, resizes, pools,
layout conversions and a detector's decode head.

MetaSchedule's generic search handles these poorly here: a YOLO decode head fuses ~40 reshape /
transpose / split / sigmoid / power / concat ops into one function, and sampling schedules for it
spent minutes simplifying the index expressions that inlining produces. These functions are
bandwidth-bound; what matters is that every output is written once, by all cores, with vector
stores. So: inline every producer that can be inlined, then for each remaining block fuse its
data-parallel loops, split off ``lanes`` elements for the vector unit and run the rest in parallel.
Reduction loops (max pooling windows) stay innermost-but-one, under the vectorised lane loop.
"""

from __future__ import annotations

from typing import Any

import tvm

#: variants a tuning run measures: (vector lanes, inline producers). ``lanes`` 0 parallelises
#: the outer loops and leaves the innermost one to LLVM (no index arithmetic per vector lane: a
#: flattened vector over a reshape/concat chain divides and takes remainders per lane); -1 leaves
#: the function as TVM lowered it (the fastest for small copies, where threads cost more).
VARIANTS: tuple[tuple[int, bool], ...] = (
    (-1, False),
    (0, True),
    (0, False),
    (16, True),
    (16, False),
    (8, True),
)


def schedule_injective(sch: tvm.s_tir.Schedule, *, lanes: int, inline: bool) -> tvm.s_tir.Schedule:
    """Schedule every block of ``sch``'s function in place (see the module docstring)."""
    root = sch.get_sblock("root")
    if lanes < 0:
        # Leave the loops as TVM lowered them. The lookup above is what makes this variant
        # storable: MetaSchedule's databases drop a tuning record whose trace is empty.
        return sch
    if inline:
        for block in list(sch.get_child_blocks(root))[:-1]:
            try:
                sch.compute_inline(block)
            except tvm.s_tir.ScheduleError:
                continue  # a reduction, or read with an incompatible pattern: stays a stage
    for block in sch.get_child_blocks(root):
        _parallel_vectorize(sch, block, lanes)
    return sch


def _parallel_vectorize(sch: tvm.s_tir.Schedule, block: Any, lanes: int) -> None:
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    if len(kinds) != len(loops):
        return  # not a plain loop nest over the block's iterators: leave it serial
    spatial = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == 0]
    reduction = [loop for loop, kind in zip(loops, kinds, strict=True) if kind != 0]
    if not spatial:
        return
    if lanes == 0:
        if len(spatial) > 1:
            sch.parallel(sch.fuse(*spatial[:-1]))
        else:
            sch.parallel(spatial[0])
        return
    if reduction:
        # Keep the window loops inside the output loops; parallelise all but the last axis.
        sch.reorder(*spatial, *reduction)
        if len(spatial) > 1:
            sch.parallel(sch.fuse(*spatial[:-1]))
        return
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    extent = int(sch.get(fused).extent)
    width = lanes if lanes > 1 and extent % lanes == 0 else 1
    if width > 1:
        outer, inner = sch.split(fused, [None, width])
        sch.parallel(outer)
        sch.vectorize(inner)
    else:
        sch.parallel(fused)


def default_variant(sch: tvm.s_tir.Schedule) -> tuple[int, bool]:
    """The variant an untuned build takes (a tuning run measures them all instead).

    Measured on yolov5n x86 (fp32 and int8, 2 threads, 31 functions): parallel outer loops with
    producers inlined, ``(0, True)``, won or tied everywhere except two kinds, which keep TVM's
    lowering: reductions (max pooling: 0.035 ms as lowered, 0.42 ms in parallel) and plain
    copies of at most two stages (a concatenation, nearest resize + concatenation: 0.07 ms vs
    0.24 ms), which LLVM already turns into vector copies. The decode head's transposes ran
    5.9 ms as lowered (four serial stages) and 0.76 ms with ``(0, True)``.
    """
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    if any(_has_reduction(sch, block) for block in blocks):
        return (-1, False)
    if len(blocks) <= 2 and not any(_computes(sch, block) for block in blocks):
        return (-1, False)
    return (0, True)


def _has_reduction(sch: tvm.s_tir.Schedule, block: Any) -> bool:
    return any(iv.iter_type != 0 for iv in sch.get(block).iter_vars)


def _computes(sch: tvm.s_tir.Schedule, block: Any) -> bool:
    """Whether the block does arithmetic on the data it loads (not only loads, selects between
    loads and index arithmetic: a copy)."""
    body = sch.get(block).body
    if not isinstance(body, tvm.tirx.stmt.BufferStore):
        return True  # not a single store: not a plain copy
    computes, _ = _walk(body.value)
    return computes


def _walk(expr: Any) -> tuple[bool, bool]:
    """(arithmetic on loaded data inside ``expr``, ``expr`` depends on loaded data)."""
    from tvm.ir import expr as ir_expr
    from tvm.ir.prim import expr as prim

    if isinstance(expr, ir_expr.TensorLoad):
        return False, True  # its indices are index arithmetic, not data
    if isinstance(expr, prim.IntImm | prim.FloatImm | ir_expr.Var):
        return False, False
    operands: list[Any] | None = None
    if isinstance(expr, prim.Select):
        operands = [expr.condition, expr.true_value, expr.false_value]
    elif isinstance(expr, ir_expr.Call) and getattr(expr.op, "name", "") == "prim.if_then_else":
        operands = list(expr.args)
    if operands is not None:  # choosing between loads is still a copy
        parts = [_walk(e) for e in operands]
        return any(c for c, _ in parts), any(r for _, r in parts)
    if isinstance(expr, prim.Cast):
        operands = [expr.value]
    elif isinstance(expr, ir_expr.Call):
        operands = list(expr.args)
    elif hasattr(expr, "a") and hasattr(expr, "b"):
        operands = [expr.a, expr.b]
    if operands is None:
        return True, True  # an expression kind this walk does not know: assume work
    parts = [_walk(e) for e in operands]
    reads = any(r for _, r in parts)
    return reads or any(c for c, _ in parts), reads
