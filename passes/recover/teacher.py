"""What the student is matched on: the values it shares with the teacher.

The student is the graph after an approximate pass (pruned, factored); the teacher is the
original. What they share is matched by value name: the output of every Conv the student has
with the same name and channel count as the teacher's (:func:`detc.passes.distill.distill_targets`),
the heads (Convs no other Conv reads) among them. Training runs on the graph cut before the
decode step, so the decoder's fixed reshapes never see the training crops' sizes. (Each step is
judged on held-out images: :mod:`detc.passes.recover.held_out`.)
"""

from __future__ import annotations

import onnx_ir as ir

from detc.compiler.errors import BadInputError
from detc.passes._graph_facts import constant_array
from detc.passes.distill import distill_targets
from detc.passes.recover.losses import LossTarget, yolo_head_layout


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
