"""Block-wise reconstruction: the student fitted to the teacher one block at a time.

A block ends at a target (a Conv output the student shares with the teacher) and holds the Convs
that value depends on and no earlier block holds; its inputs are the values where it starts (the
graph input, or outputs of Convs of earlier blocks). Blocks are fitted in graph order, each on
the student's *own* inputs (after the blocks before it were fitted, so each block also absorbs
what remains of the error upstream) against the teacher's cached output, with Adam for a fixed
number of steps on a few dozen cached crops. A step of one block costs a fraction of an
end-to-end step, and the blocks' optima do not fight over a shared loss (what FSKD and
BRECQ-style reconstruction exploit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detc.passes.recover.losses import LossTarget, target_loss
from detc.passes.torch_graph import TorchGraph

#: a block whose loss starts below this (relative error) is left as it is: nothing was cut there
_NOTHING_TO_FIT = 1e-7


@dataclass(frozen=True)
class Block:
    target: LossTarget
    inputs: tuple[str, ...]  # values the block starts from
    parameters: tuple[str, ...]  # the trainable tensors of its Convs


def plan_blocks(student: TorchGraph, targets: Sequence[LossTarget], input_name: str) -> list[Block]:
    """One block per target, in graph order; Convs belong to the first block that needs them."""
    owned: set[str] = set()  # outputs of Convs already in a block
    blocks = []
    for target in targets:
        nodes = student.nodes_between([input_name, *owned], [target.name])
        convs = [n for n in nodes if n.op_type == "Conv"]
        parameters = tuple(
            v.name
            for n in convs
            for v in n.inputs[1:3]
            if v is not None and v.name in student.parameters
        )
        produced = {o.name for n in nodes for o in n.outputs if o is not None}
        read = {
            v.name
            for n in nodes
            for v in n.inputs
            if v is not None
            and v.name
            and v.name not in produced
            and v.name not in student.constants
        }
        owned |= {n.outputs[0].name for n in convs if n.outputs[0].name}
        if parameters:
            blocks.append(Block(target, tuple(sorted(read)), parameters))
    return blocks


def reconstruct_blocks(
    student: TorchGraph,
    blocks: Sequence[Block],
    inputs: Any,
    teacher_outputs: dict[str, Any],
    input_name: str,
    *,
    steps: int,
    batch: int,
    lr_for: Callable[[str], float],
    seed: int,
    torch: Any,
    time_left: Callable[[], float],
    on_block: Callable[[int, float, float], None] | None = None,
) -> int:
    """Fit each block in order (in place); how many were fitted before the time ran out.

    A block whose fit does not lower its own loss on the cached crops keeps its weights.
    """
    rng = np.random.default_rng(seed)
    count = int(inputs.shape[0])
    fitted = 0
    # the student's own values where later blocks start, kept as the blocks before are fitted:
    # each block then runs alone instead of recomputing the graph up to it
    needed = {name for block in blocks for name in block.inputs}
    current: dict[str, Any] = {input_name: inputs}
    for index, block in enumerate(blocks):
        if time_left() <= 0:
            break
        with torch.no_grad():
            missing = [name for name in block.inputs if name not in current]
            if missing:
                current.update(student.run({input_name: inputs}, missing))
            starts = {name: current[name] for name in block.inputs}
        expected = teacher_outputs[block.target.name]

        def loss_on(
            rows: Any,
            block: Block = block,
            starts: dict[str, Any] = starts,
            expected: Any = expected,
        ) -> Any:
            feeds = {name: value[rows] for name, value in starts.items()}
            got = student.run(feeds, [block.target.name])[block.target.name]
            return target_loss(torch, got, expected[rows], block.target)

        everything = torch.arange(count)
        with torch.no_grad():
            before = float(loss_on(everything))
        if before < _NOTHING_TO_FIT:
            _keep(student, block, starts, needed, current, torch)
            continue
        saved = {name: student.parameters[name].detach().clone() for name in block.parameters}
        optimizer = torch.optim.Adam(
            [{"params": [student.parameters[n]], "lr": lr_for(n)} for n in block.parameters]
        )
        for _ in range(steps):
            if time_left() <= 0:
                break  # the budget is wall-clock: a block stops mid-fit, and is judged as is
            rows = torch.as_tensor(rng.choice(count, size=min(batch, count), replace=False))
            loss = loss_on(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            after = float(loss_on(everything))
            if not after < before:
                for name, value in saved.items():
                    student.parameters[name].copy_(value)
                after = before
        _keep(student, block, starts, needed, current, torch)
        fitted += 1
        if on_block is not None:
            on_block(index, before, after)
    return fitted


def _keep(
    student: TorchGraph,
    block: Block,
    starts: dict[str, Any],
    needed: set[str],
    current: dict[str, Any],
    torch: Any,
) -> None:
    """Store the block's values that later blocks start from, with its final weights."""
    produced = [
        o.name
        for n in student.nodes_between(list(starts), [block.target.name])
        for o in n.outputs
        if o is not None and o.name in needed and o.name not in current
    ]
    if produced:
        with torch.no_grad():
            current.update(student.run(starts, produced))
