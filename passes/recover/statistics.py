"""Statistics recalibration: each matched Conv's per-channel mean and spread set to the teacher's.

After a cut, a Conv reading fewer channels sees inputs whose statistics drifted; its outputs'
per-channel mean and standard deviation drift with them, and the drift compounds downstream.
Folding an affine correction into the Conv (``y' = (y - mu_s) * sigma_t / sigma_s + mu_t``:
weights scaled, bias shifted) restores the first two moments the next layers were trained on —
what re-estimating BatchNorm statistics does for a model whose BatchNorm is folded. Conv by Conv
in graph order, each on the student's own activations after the corrections before it. The
scale is clamped to [1/2, 2]: a channel the cut all but silenced is not blown up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from detc.passes.recover.losses import LossTarget
from detc.passes.torch_graph import TorchGraph

_MAX_GAIN = 2.0


def recalibrate_statistics(
    student: TorchGraph,
    teacher_outputs: dict[str, Any],
    inputs: Any,
    input_name: str,
    targets: Sequence[LossTarget],
    torch: Any,
) -> int:
    """Correct every target Conv in place; how many were corrected."""
    corrected = 0
    with torch.no_grad():
        for target in targets:
            node = student.producer(target.name)
            if node is None or node.op_type != "Conv":
                continue
            weight_name = node.inputs[1].name if node.inputs[1] is not None else None
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if (
                weight_name not in student.parameters
                or bias is None
                or bias.name not in student.parameters
            ):
                continue
            got = student.run({input_name: inputs}, [target.name])[target.name]
            expected = teacher_outputs[target.name]
            mean_s, mean_t = got.mean(dim=(0, 2, 3)), expected.mean(dim=(0, 2, 3))
            std_s, std_t = got.std(dim=(0, 2, 3)), expected.std(dim=(0, 2, 3))
            gain = (std_t / std_s.clamp_min(1e-8)).clamp(1 / _MAX_GAIN, _MAX_GAIN)
            weight = student.parameters[weight_name]
            bias_tensor = student.parameters[bias.name]
            weight.mul_(gain.reshape(-1, *([1] * (weight.dim() - 1))))
            bias_tensor.copy_((bias_tensor - mean_s) * gain + mean_t)
            corrected += 1
    return corrected
