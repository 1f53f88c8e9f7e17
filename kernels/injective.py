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
