"""How each recovery step is judged: the student on held-out images the training never sees.

Two measures, taken in one pass over those images:

* the **head loss** (what training minimises, :func:`~detc.passes.recover.losses.head_loss`) and
  the feature loss;
* the **agreement** of the student's detections with the teacher's: COCO-style mAP@[.5:.95] with
  the teacher's confident detections as ground truth
  (:func:`~detc.compiler.detection.agreement.map_against_reference`), where the model's outputs
  decode with its spec's decoder.

Agreement decides which weights are kept where it exists, the head loss elsewhere (and between
equal agreements). The loss alone does not track accuracy: on yolov5n pruned -10 %, end-to-end
distillation took the held-out head loss from 0.995 to 0.323 while mAP@[.5:.95] on COCO images
went from 26.7 to 26.4, dipping to 24.6 on the way; agreement on 64 other images fell from 67.3
to 64.6 in that dip, where the loss had already fallen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from detc.compiler.detection.agreement import confident_truths, map_against_reference
from detc.compiler.detection.decoders import Detections, decode
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError
from detc.passes.recover.data import as_input
from detc.passes.recover.losses import LossTarget, features_loss, head_loss
from detc.passes.torch_graph import TorchGraph


@dataclass(frozen=True)
class Measure:
    """The student on the held-out images; ``agreement`` None where the outputs do not decode."""

    loss: float
    feature_loss: float
    agreement: float | None = None

    def better_than(self, other: Measure) -> bool:
        """Higher agreement where both have one; else (or when equal) lower head loss."""
        ours, theirs = self.agreement, other.agreement
        if ours is not None and theirs is not None and ours != theirs:
            return ours > theirs
        return self.loss < other.loss

    def describe(self) -> str:
        text = f"head loss {self.loss:.5f}"
        if self.agreement is not None:
            text += f", agreement {100 * self.agreement:.2f} %"
        return text


class HeldOut:
    """The held-out images, the teacher's outputs and detections on them, and the student's
    :class:`Measure` there."""

    def __init__(
        self,
        teacher: TorchGraph,
        images: Sequence[Any],
        scale: float,
        input_name: str,
        targets: Sequence[LossTarget],
        torch: Any,
        *,
        spec: ModelSpec | None = None,
        output_names: Sequence[str] = (),
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
        self._spec = spec
        self._outputs = list(output_names)
        self._truths = self._teacher_truths(teacher)

    @property
    def judges_detections(self) -> bool:
        """Whether agreement (not the head loss) decides what is kept."""
        return self._truths is not None

    def _teacher_truths(self, teacher: TorchGraph) -> list[Detections] | None:
        """The teacher's confident detections, or None where its outputs do not decode."""
        if self._spec is None or not self._outputs:
            return None
        try:
            with self.torch.no_grad():
                found = self._detections(teacher, self.expected)
        except (BadInputError, ValueError, IndexError, KeyError, RuntimeError):
            return None  # a spec inferred for outputs that are not a detector's
        return confident_truths(found)

    def _detections(
        self, graph: TorchGraph, computed: Sequence[dict[str, Any]]
    ) -> list[Detections]:
        """Decoded outputs of ``graph``, one image at a time from its matched values (the decode
        step's reshapes are written for one image)."""
        assert self._spec is not None
        found = []
        for inputs, values in zip(self.batches, computed, strict=True):
            for i in range(int(inputs.shape[0])):
                given = {name: value[i : i + 1] for name, value in values.items()}
                given[self.input_name] = inputs[i : i + 1]
                outputs = graph.run(given, self._outputs)
                arrays = {name: outputs[name].detach().numpy() for name in self._outputs}
                found.append(decode(self._spec.decoder, arrays, self._spec))
        return found

    def measure(self, student: TorchGraph) -> Measure:
        """The student's losses (means over the held-out batches) and agreement."""
        heads = features = 0.0
        computed = []
        with self.torch.no_grad():
            for batch, expected in zip(self.batches, self.expected, strict=True):
                got = student.run({self.input_name: batch}, self.wanted)
                computed.append(got)
                heads += float(head_loss(self.torch, got, expected, self.targets))
                features += float(features_loss(self.torch, got, expected, self.targets))
            agreement = None
            if self._truths is not None:
                agreement = map_against_reference(self._truths, self._detections(student, computed))
        count = len(self.batches)
        return Measure(heads / count, features / count, agreement)
