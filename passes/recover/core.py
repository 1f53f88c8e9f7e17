"""recover: win back what an approximate pass lost, by distilling from the original model on
unlabeled images.

Users of a deployment compiler rarely have their training pipeline at hand, but they have images
from where the detector will run. ``recover`` needs no labels: the original model (the teacher)
labels every image itself. It runs after ``prune`` or ``lowrank`` in the same pipeline
(``prune{mac_reduction=0.2},recover{images=DIR,minutes=20}``), where the teacher is the model as
it entered the first approximate pass, or on its own with ``teacher=ORIGINAL.onnx``.

The student (the transformed graph) runs as a torch function whose Conv weights and biases are
trained (:class:`detc.passes.torch_graph.TorchGraph`), on the graph cut before the decode step.
The recipe is a sequence of steps, each judged on held-out images the training never sees:

1. ``stats``  — per-channel scale and bias of every matched Conv reset to the teacher's;
2. ``blocks`` — block-wise reconstruction on cached crops (:mod:`.blockwise`);
3. ``e2e``    — end-to-end distillation with progressive crop sizes and augmentation.

A step that makes the held-out measure worse is undone and reported as rejected: the agreement of
the student's detections with the teacher's where the outputs decode, else the head loss
(:mod:`.held_out`). With ``labels=``, annotated images add YOLOv5's detection loss to the
end-to-end step (:mod:`.labeled`). The whole recovery keeps to a wall-clock budget (``minutes``);
with ``steps`` set, the end-to-end step runs exactly that many steps, so a seed gives the same
weights on the same machine. Progress lines give the time left.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from detc.compiler.detection.spec import ModelSpec, spec_for_model
from detc.compiler.errors import BadInputError
from detc.compiler.fileio import write_file_atomically
from detc.compiler.ir.pass_base import DetcPass, PassResult
from detc.passes.recover.blockwise import plan_blocks, reconstruct_blocks
from detc.passes.recover.data import AugmentedCrops, ImageSet, load_images
from detc.passes.recover.end_to_end import distill_end_to_end
from detc.passes.recover.held_out import HeldOut, Measure
from detc.passes.recover.labeled import LabeledLoss, load_labeled
from detc.passes.recover.losses import LossTarget
from detc.passes.recover.options import RecoverOptions
from detc.passes.recover.report import RecoverReport, StepRecord
from detc.passes.recover.statistics import recalibrate_statistics
from detc.passes.recover.teacher import loss_targets
from detc.passes.torch_graph import TorchGraph, import_torch

logger = logging.getLogger(__name__)

#: seconds between progress lines in a log
_PROGRESS_SECONDS = 15.0


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(round(seconds), 0), 60)
    return f"{minutes}:{rest:02d}"


class _Budget:
    """The wall-clock deadline of one recovery."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


class RecoverPass(DetcPass):
    """Recover accuracy lost by prune/lowrank: distil from the original on unlabeled images."""

    name = "recover"
    exact = False
    Options = RecoverOptions
    calibration_option = "images"
    wants_original = True
    options: RecoverOptions

    def _teacher(self) -> tuple[ir.Model, str]:
        if self.options.teacher is not None:
            path = Path(self.options.teacher)
            if not path.is_file():
                raise BadInputError(f"recover: teacher={path} is not a file (the original ONNX)")
            try:
                return ir.load(path), str(path)
            except Exception as exc:
                raise BadInputError(
                    f"recover: teacher={path} is not a readable ONNX model ({exc})"
                ) from None
        if self.original is None:
            raise BadInputError(
                "recover: no teacher — run it after prune or lowrank in the same pipeline "
                "(prune{...},recover{...}) or give teacher=ORIGINAL.onnx"
            )
        return self.original, "the model before the pipeline's first approximate pass"

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        if opts.images is None:
            raise BadInputError(
                "recover: give images=DIR (unlabeled images from where the detector will run)"
            )
        if not Path(opts.images).is_dir():
            raise BadInputError(f"recover: images={opts.images} is not a folder of images")
        teacher_model, teacher_label = self._teacher()
        torch = import_torch()
        budget = _Budget(opts.minutes * 60.0)
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(opts.threads)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(opts.seed)
        try:
            modified = self._recover(model, teacher_model, teacher_label, budget, torch)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
        return PassResult(model, modified)

    def _recover(
        self,
        model: ir.Model,
        teacher_model: ir.Model,
        teacher_label: str,
        budget: _Budget,
        torch: Any,
    ) -> bool:
        from detc.compiler.reference import to_proto

        opts = self.options
        spec = spec_for_model(to_proto(model), opts.spec)
        if opts.labels is not None:
            if spec.decoder != "yolov5":
                raise BadInputError(
                    f"recover: labels= trains YOLOv5-style heads (decoder yolov5); this model's "
                    f"decoder is {spec.decoder!r}: leave labels out to distil from the teacher"
                )
            if not Path(opts.labels).is_dir():
                raise BadInputError(
                    f"recover: labels={opts.labels} is not a COCO-format dataset folder"
                )
        input_name = model.graph.inputs[0].name or spec.input_name
        targets = loss_targets(
            model.graph, teacher_model.graph, spec.decoder, len(spec.class_names)
        )
        assert opts.images is not None
        images = load_images(
            Path(opts.images),
            spec,
            max_images=opts.max_images,
            held_out=opts.held_out,
            seed=opts.seed,
            torch=torch,
        )
        run = _Recovery(
            model, teacher_model, images, targets, input_name, spec, opts, budget, torch
        )
        report = RecoverReport(
            teacher=teacher_label,
            train_images=len(images.train),
            held_out_images=len(images.held_out),
            targets=len(targets),
            heads=sum(t.head for t in targets),
            budget_seconds=budget.seconds,
            judged_by="detections" if run.held_out.judges_detections else "head loss",
        )
        self.report = report
        measuring = time.monotonic()
        report.initial = before = run.held_out.measure(run.student)
        measure_seconds = time.monotonic() - measuring
        logger.info(
            "recover: %d matched values (%d heads), held-out %s, %s left",
            len(targets),
            report.heads,
            report.initial.describe(),
            _clock(budget.left()),
        )
        recipe = opts.recipe_steps
        for position, step in enumerate(recipe):
            if budget.left() <= 0:
                logger.info("recover: budget spent before step %s", step)
                break
            started = time.monotonic()
            saved = run.student.snapshot()
            if step == "stats":
                detail = run.statistics()
            elif step == "blocks":
                detail = run.blocks(leave_for_later=0.5 if "e2e" in recipe[position + 1 :] else 0.0)
            else:
                detail = run.end_to_end(report, before, measure_seconds)
            after = run.held_out.measure(run.student)
            kept = after.better_than(before)
            report.steps.append(
                StepRecord(step, before, after, kept, time.monotonic() - started, detail)
            )
            logger.info(
                "recover: %s: held-out %s -> %s, %s (%s), %s left",
                step,
                before.describe(),
                after.describe(),
                "kept" if kept else "REJECTED, weights restored",
                detail,
                _clock(budget.left()),
            )
            if kept:
                before = after
            else:
                run.student.restore(saved)
            run.checkpoint(f"after-{position + 1}-{step}")
        report.final = before
        report.seconds = budget.elapsed()
        run.student.write_back()
        logger.info("%s", report.table())
        return any(s.kept for s in report.steps)


class _Ticker:
    """Says whether a progress line is due (one every few seconds in a log)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def due(self, *, now: bool = False) -> bool:
        if now or time.monotonic() - self.last >= _PROGRESS_SECONDS:
            self.last = time.monotonic()
            return True
        return False


class _Recovery:
    """The state one recovery shares between its steps: student, teacher, images, budget."""

    def __init__(
        self,
        model: ir.Model,
        teacher_model: ir.Model,
        images: ImageSet,
        targets: list[LossTarget],
        input_name: str,
        spec: ModelSpec,
        options: RecoverOptions,
        budget: _Budget,
        torch: Any,
    ) -> None:
        self.model = model
        self.images = images
        self.targets = targets
        self.input_name = input_name
        self.options = options
        self.budget = budget
        self.torch = torch
        self.student = TorchGraph(model.graph, trainable=True)
        self.teacher = TorchGraph(teacher_model.graph)
        self.held_out = HeldOut(
            self.teacher,
            images.held_out,
            images.scale,
            input_name,
            targets,
            torch,
            spec=spec,
            output_names=[v.name for v in model.graph.outputs if v.name],
        )
        self.crops = AugmentedCrops(
            images, options.seed, torch, mosaic=options.mosaic, jitter=options.jitter
        )
        # the step size of each tensor scales with its size at the start (BN-folded weights
        # differ ~75x in magnitude between tensors: one step size fits none of them)
        self.initial_rms = {
            name: max(float(t.detach().pow(2).mean().sqrt()), 1e-3)
            for name, t in self.student.parameters.items()
        }
        self._cached: tuple[Any, dict[str, Any]] | None = None
        self.labeled = self._labeled(spec) if options.labels is not None else None

    def _labeled(self, spec: ModelSpec) -> LabeledLoss:
        """The detection loss on the annotated images of ``labels=``."""
        outputs = [v.name for v in self.model.graph.outputs if v.name]
        output = spec.output_name or outputs[0]
        return LabeledLoss(
            load_labeled(Path(str(self.options.labels)), spec, self.torch),
            self.student,
            [t.name for t in self.targets if t.head],
            output,
            self.input_name,
            self.images.scale,
            self.options.seed,
            self.torch,
        )

    def lr_for(self, name: str) -> float:
        if self.options.lr_scaling == "rms":
            return self.options.lr * self.initial_rms[name]
        return self.options.lr

    def cached_crops(self) -> tuple[Any, dict[str, Any]]:
        """Crops at native scale and the teacher's outputs on them (statistics, blocks)."""
        if self._cached is None:
            count = min(self.options.block_images, len(self.images.train))
            inputs = self.crops.batch(count, self.options.block_size, augment=False)
            with self.torch.no_grad():
                wanted = [t.name for t in self.targets]
                self._cached = inputs, self.teacher.run({self.input_name: inputs}, wanted)
        return self._cached

    def checkpoint(self, label: str) -> None:
        if self.options.checkpoints is None:
            return
        path = Path(self.options.checkpoints) / f"{label}.onnx"
        self.student.write_back()
        model = self.model
        write_file_atomically(path, lambda tmp: ir.save(model, tmp, format="protobuf"))
        logger.info("recover: wrote %s", path)

    def statistics(self) -> str:
        inputs, expected = self.cached_crops()
        count = recalibrate_statistics(
            self.student, expected, inputs, self.input_name, self.targets, self.torch
        )
        return f"{count} Convs recalibrated on {inputs.shape[0]} crops"

    def blocks(self, *, leave_for_later: float) -> str:
        inputs, expected = self.cached_crops()
        blocks = plan_blocks(self.student, self.targets, self.input_name)
        reserve = self.budget.left() * leave_for_later
        ticker = _Ticker()

        def on_block(index: int, loss_before: float, loss_after: float) -> None:
            if ticker.due():
                logger.info(
                    "recover: blocks %d/%d (block loss %.4f -> %.4f), %s left",
                    index + 1,
                    len(blocks),
                    loss_before,
                    loss_after,
                    _clock(self.budget.left()),
                )

        fitted = reconstruct_blocks(
            self.student,
            blocks,
            inputs,
            expected,
            self.input_name,
            steps=self.options.block_steps,
            batch=min(8, int(inputs.shape[0])),
            lr_for=self.lr_for,
            seed=self.options.seed,
            torch=self.torch,
            time_left=lambda: self.budget.left() - reserve,
            on_block=on_block,
        )
        return f"{fitted}/{len(blocks)} blocks x {self.options.block_steps} steps"

    def end_to_end(self, report: RecoverReport, start: Measure, measure_seconds: float) -> str:
        # what is left, less the two held-out measures after training (e2e's last, the step's)
        seconds = max(self.budget.left() - 2 * measure_seconds, 1.0)
        ticker = _Ticker()

        def on_progress(step: int, size: int, loss: float, measured: Measure | None) -> None:
            if ticker.due(now=measured is not None):
                logger.info(
                    "recover: e2e step %d at %d px, training loss %.4f%s, %s left",
                    step,
                    size,
                    loss,
                    "" if measured is None else f", held-out {measured.describe()}",
                    _clock(self.budget.left()),
                )

        def on_check(step: int, seconds: float) -> None:
            del seconds
            self.checkpoint(f"e2e-{self.budget.elapsed() / 60:05.1f}min-step{step}")

        curve = distill_end_to_end(
            self.student,
            self.teacher,
            self.crops,
            self.held_out,
            start,
            self.targets,
            self.input_name,
            sizes=self.options.crop_sizes,
            batch=self.options.batch,
            features=self.options.features,
            lr_for=self.lr_for,
            seconds=seconds,
            steps=self.options.steps,
            torch=self.torch,
            labeled=self.labeled,
            label_weight=self.options.label_weight,
            label_batch=self.options.label_batch,
            on_progress=on_progress,
            on_check=on_check,
        )
        report.curve = curve.points
        labels = "" if self.labeled is None else f", with {len(self.labeled.images)} labeled images"
        return f"{curve.steps} steps, best at step {curve.best_step}{labels}"
