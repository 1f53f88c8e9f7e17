"""The teacher: what the student is matched on, and the teacher's outputs cached where reused.

The student is the graph after an approximate pass (pruned, factored); the teacher is the
original. What they share is matched by value name: the output of every Conv the student has
with the same name and channel count as the teacher's (:func:`detc.passes.distill.distill_targets`),
the heads (Convs no other Conv reads) among them. Training runs on the graph cut before the
decode step, so the decoder's fixed reshapes never see the training crops' sizes.

The held-out images' teacher outputs are computed once and kept: every step of the recovery is
judged by the student's loss on them (:class:`HeldOut`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.passes._graph_facts import constant_array
from detc.passes.distill import distill_targets
from detc.passes.recover.data import as_input
from detc.passes.recover.losses import LossTarget, features_loss, head_loss, yolo_head_layout
from detc.passes.torch_graph import TorchGraph


def loss_targets(
    student: ir.Graph, teacher: ir.Graph, decoder: str, classes: int
) -> list[LossTarget]:
    """The values the student is matched on, in graph order; at least one head."""
    found = distill_targets(student, teacher, features=True)
    if not any(t.head for t in found):
        raise BadInputError(
            f"recover: no head Conv of graph '{student.name}' has the same name and channel "
            "count as the teacher's: is the teacher the model this one was made from?"
        )
    channels = {}
    for node in student:
        if node.op_type == "Conv" and node.outputs[0].name:
            weight = constant_array(node.inputs[1])
            if weight is not None:
                channels[node.outputs[0].name] = int(weight.shape[0])
    targets = []
    for t in found:
        layout = yolo_head_layout(channels[t.name], decoder, classes) if t.head else None
        targets.append(LossTarget(t.name, t.head, t.sigmoid, layout))
    return targets


class HeldOut:
    """The held-out images, the teacher's outputs on them, and the student's loss there."""

    def __init__(
        self,
        teacher: TorchGraph,
        images: Sequence[Any],
        scale: float,
        input_name: str,
        targets: Sequence[LossTarget],
        torch: Any,
        *,
        batch: int = 4,
    ) -> None:
        self.torch = torch
        self.targets = list(targets)
        self.input_name = input_name
        self.wanted = [t.name for t in targets]
        self.batches = [
            as_input(images[i : i + batch], scale, torch) for i in range(0, len(images), batch)
        ]
        with torch.no_grad():
            self.expected = [teacher.run({input_name: b}, self.wanted) for b in self.batches]

    def losses(self, student: TorchGraph) -> tuple[float, float]:
        """The student's (head loss, feature loss), means over the held-out images."""
        heads = features = 0.0
        with self.torch.no_grad():
            for batch, expected in zip(self.batches, self.expected, strict=True):
                got = student.run({self.input_name: batch}, self.wanted)
                heads += float(head_loss(self.torch, got, expected, self.targets))
                features += float(features_loss(self.torch, got, expected, self.targets))
        return heads / len(self.batches), features / len(self.batches)

    def loss(self, student: TorchGraph) -> float:
        """What decides whether a step is kept: the heads' error (what detection reads)."""
        return self.losses(student)[0]
