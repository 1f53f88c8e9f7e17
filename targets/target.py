"""A target is a named sequence of phases that turns an ONNX model into a loadable library.

    import → legalize → tune → [prepost] → build → export

* **import**   ONNX → Relax (``from_onnx(keep_params_in_input=True)`` + ``detach_params``); float16
               graphs are computed in float32 where the target asks for it (``promote_float16``).
* **legalize** Relax operators → TIR functions, fused (LegalizeOps … FuseTIR).
* **tune**     choose schedules for those TIR functions. Without tuning options it reports
               ``untuned``; with :class:`~detc.targets.tuning.options.TuningOptions`
               (``ctx.tuning``) it applies the tuning database and, with ``tune=True``, searches
               for what it lacks (:mod:`detc.targets.tuning.phase`).
* **prepost**  only with ``--with-preprocess`` / ``--with-nms`` (``ctx.prepost``): wraps the
               tuned network in compiled letterbox / decode + NMS (:mod:`detc.targets.prepost`).
* **build**    ``tvm.compile`` to a Relax VM executable for :meth:`Target.tvm_target_json`.
* **export**   the shared library (``export_library``, with :meth:`Target.export_options`, e.g. a
               cross compiler) and the parameters file, into the staging directory.

Every phase is a method ``(self, ctx: BuildContext) -> str`` returning a one-line summary, and
reads/writes only the :class:`BuildContext`. A target declares its *pipelines*: named lists of
phases (:meth:`Target.pipelines`; most targets have one, x86 has "plain" and "blocked"), and
which one a build runs (:meth:`Target.pipeline_for`, recorded in ``ctx.pipeline``).

A new target (arm, cuda) subclasses :class:`Target`, sets ``family``/``machine`` (and
``device_kind`` when its code does not run on the CPU), implements :meth:`Target.tvm_target_json`,
:meth:`Target.from_variant` and :meth:`Target.infos`, overrides only the hooks where it must differ
(``export_options``, ``check_toolchain``, ``legalize_passes``, ``device``, a phase, a pipeline),
and registers itself with :func:`register_target` (imported from ``detc.targets.__init__``).

A cross target, in outline::

    @register_target
    class ArmTarget(Target):
        family, machine = "arm", "aarch64"

        def tvm_target_json(self, num_threads):
            return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"],
                    "num-cores": num_threads}

        def export_options(self):
            return {"cc": "aarch64-linux-gnu-gcc"}

        def check_toolchain(self):
            ...  # ToolchainMissingError when aarch64-linux-gnu-gcc is absent

The loader (runtime.py) refuses a library whose ELF machine is not this host's and points to
``detc verify --emulate``; running under emulation belongs to the arm target's own runner.

TVM is imported inside the phase methods only: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from detc.compiler.errors import BadInputError, DetcError, UnsupportedModelError
from detc.targets.context import (
    LIBRARY_FILE,
    PARAMS_FILE,
    PREPOST_PHASE,
    BuildContext,
    Phase,
    param_key,
)
from detc.targets.precision import promote_float16_to_float32
from detc.targets.tuning.options import TuningOptions
from detc.targets.tuning.phase import tune_phase
from detc.targets.tuning.tasks import TemplateTiles, count_unscheduled

logger = logging.getLogger("detc.targets")

#: the pipeline of a target that declares only one
DEFAULT_PIPELINE = "default"


@dataclass(frozen=True)
class TargetInfo:
    """One line of ``detc targets``."""

    name: str  # what --target accepts, e.g. "x86" or "x86:<mcpu>"
    description: str
    enables: str  # what code generation it turns on (ISA, CPU model, threads)


class Target(ABC):
    """A compilation target: TVM target JSON + the phases, with hooks where targets differ."""

    #: the part of the target name before ":" ("x86", "arm", "cuda")
    family: ClassVar[str]
    #: the ISA the exported library is for, as ``platform.machine()`` names it on Linux
    machine: ClassVar[str]
    #: TVM's name for the kind of device the code runs on ("cpu", "cuda"): see :meth:`device`
    device_kind: ClassVar[str] = "cpu"
    #: compute float16 graphs in float32 (casts at the graph boundary): see precision.py
    promote_float16: ClassVar[bool] = True
    #: what ``build_artifact(precision=...)`` may ask of this target
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ---- what every target must say -------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_variant(cls, variant: str | None) -> Target:
        """The target for ``<family>`` (variant None) or ``<family>:<variant>``; BadInputError
        when the variant is not valid."""

    @classmethod
    @abstractmethod
    def infos(cls) -> list[TargetInfo]:
        """Lines for ``detc targets`` (must not import TVM)."""

    @abstractmethod
    def tvm_target_json(self, num_threads: int) -> dict[str, Any]:
        """The TVM target as a JSON dict, e.g. ``{"kind": "llvm", "mcpu": "znver3", ...}``."""

    def host_cpu(self) -> dict[str, Any] | None:
        """What the manifest records about the CPU the artifact is built for (or on)."""
        return None

    def default_num_threads(self) -> int:
        return 1

    # ---- hooks ----------------------------------------------------------------------------
    def device(self, session: Any = None) -> Any:
        """The device this target's code runs on: on this machine (``tvm.cpu(0)`` for a CPU
        target), or on the board behind an RPC ``session`` (``session.cpu(0)``)."""
        if session is not None:
            return session.device(self.device_kind, 0)
        import tvm

        return tvm.device(self.device_kind, 0)

    def check_toolchain(self) -> None:  # noqa: B027  (a hook: most targets need no check)
        """Raise ToolchainMissingError before any slow phase when export could not link."""

    def export_options(self) -> dict[str, Any]:
        """Keyword arguments for ``export_library`` (e.g. ``cc=`` for a cross compiler)."""
        return {}

    def legalize_passes(self) -> list[Any]:
        """Relax passes of the legalize phase (called inside ``with tvm_target``)."""
        from tvm import relax

        return [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]

    # ---- the pipelines --------------------------------------------------------------------
    def pipelines(self) -> dict[str, list[Phase]]:
        """The named pipelines this target offers, each its phases in order (PHASE_NAMES)."""
        return {
            DEFAULT_PIPELINE: [
                Phase("import", self.import_model),
                Phase("legalize", self.legalize),
                Phase("tune", self.tune),
                Phase("build", self.build),
                Phase("export", self.export),
            ]
        }

    def pipeline_for(self, tuning: TuningOptions | None) -> str:
        """The pipeline a build with ``tuning`` options (None: :meth:`default_tuning`) runs."""
        return next(iter(self.pipelines()))

    def fallback_pipeline(self, pipeline: str | None) -> str | None:
        """The pipeline to rebuild with when ``pipeline``, chosen by default, fails (None: none)."""
        return None

    def conv_template_tiles(self) -> TemplateTiles | None:
        """The default tiles of detc's convolution template for this target's registers
        (``(out_blocks, out_h, out_w) -> {"oc_tile", "oh_tile", "ow_tile"}``); None: the
        AVX-512 defaults."""
        return None

    def default_tuning(self) -> TuningOptions | None:
        """What a build that asked for no tuning gets. None: TVM's default schedules.

        A target with a schedule template of its own returns options that reuse the tuning
        database and give every kernel it lacks the template's default tiles: "untuned" must
        never mean TVM's generic loop nests where detc has something 50x faster.
        """
        return None

    def phases(self, pipeline: str | None = None) -> list[Phase]:
        """The phases of ``pipeline`` (None: the first one declared)."""
        pipelines = self.pipelines()
        chosen = pipeline if pipeline is not None else next(iter(pipelines))
        if chosen not in pipelines:
            raise ValueError(f"{self.name} has no pipeline {chosen!r}; it has {list(pipelines)}")
        return pipelines[chosen]

    # ---- the phases -----------------------------------------------------------------------

    def import_model(self, ctx: BuildContext) -> str:
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        model = ctx.model
        promoted = False
        if self.promote_float16:
            model, promoted = promote_float16_to_float32(model)
        ctx.manifest["precision"] = {
            "compute": "float32" if promoted else "as-model",
            "float16_promoted": promoted,
        }
        _refuse_dynamic_inputs(model)
        _refuse_unsupported_ops(model)
        model = _index_initializers_as_constants(model)
        chatter = io.StringIO()
        try:
            # The importer print()s the op it failed on and warns about checker findings: keep
            # both off the user's terminal and use them for the error message.
            with contextlib.redirect_stdout(chatter), warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                mod = from_onnx(model, keep_params_in_input=True)
        except Exception as err:
            raise _import_error(ctx.model, chatter.getvalue(), err) from err
        for warning in seen:
            logger.debug("onnx importer: %s", warning.message)
        mod, params = relax.frontend.detach_params(mod)
        ctx.mod = mod
        # np.asarray, not np.ascontiguousarray: that makes a 0-d parameter shape (1,)
        ctx.params = [np.asarray(p.numpy(), order="C") for p in params.get("main", [])]
        ctx.num_inputs = int(mod["main"].attrs["num_input"])
        summary = f"{ctx.num_inputs} input(s), {len(ctx.params)} parameters"
        return summary + (", float16 computed in float32" if promoted else "")

    def legalize(self, ctx: BuildContext) -> str:
        import tvm

        with ctx.tvm_target:
            ctx.mod = tvm.transform.Sequential(self.legalize_passes())(ctx.mod)
        return f"{count_tir_functions(ctx.mod)} TIR functions"

    def tune(self, ctx: BuildContext) -> str:
        """With tuning options: database + search (tuning/phase.py). Without: every TIR function
        keeps TVM's default (unscheduled) loop nest."""
        if ctx.tuning is not None:
            return tune_phase(self, ctx)
        # hand-scheduled kernels (int8 convolutions) are already as fast as they get
        untuned = count_unscheduled(ctx.mod)
        ctx.manifest["tuning"] = {
            "tuned": False,
            "trials": 0,
            "database_digest": None,
            "untuned_tasks": untuned,
        }
        ctx.warn(
            f"untuned build: {untuned} TIR kernels use TVM's default schedules "
            "(correct, but typically 50-100x slower than onnxruntime)"
        )
        return "untuned"

    def build(self, ctx: BuildContext) -> str:
        import tvm

        ctx.executable = tvm.compile(ctx.mod, target=ctx.tvm_target)
        return f"{ctx.tvm_target.kind.name} executable"

    def export(self, ctx: BuildContext) -> str:
        workspace = ctx.staging_dir / ".export-workspace"
        workspace.mkdir()
        library = ctx.staging_dir / LIBRARY_FILE
        ctx.executable.export_library(
            str(library), workspace_dir=str(workspace), **self.export_options()
        )
        _remove_tree(workspace)
        arrays: dict[str, Any] = {param_key(i): p for i, p in enumerate(ctx.params)}
        np.savez(ctx.staging_dir / PARAMS_FILE, **arrays)
        size_mb = library.stat().st_size / 1e6
        return f"{LIBRARY_FILE} {size_mb:.1f} MB, {PARAMS_FILE} {len(ctx.params)} arrays"


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def count_tir_functions(mod: Any) -> int:
    import tvm

    return sum(isinstance(f, tvm.tirx.PrimFunc) for f in mod.functions.values())


class _PhaseFailed(Exception):
    def __init__(self, phase: str, error: Exception) -> None:
        super().__init__(phase)
        self.phase, self.error = phase, error


def run_phases(target: Target, ctx: BuildContext, only: tuple[str, ...] | None = None) -> None:
    """Run ``target``'s phases in order (``only``: just these), timing each; TVM failures become
    one-line DetcErrors.

    A build that asked for no tuning gets :meth:`Target.default_tuning`; if that default pipeline
    fails on this model (a layout the template cannot express), the build starts over on the
    target's :meth:`Target.fallback_pipeline` and says so: the default must never be the reason
    a model does not compile.
    """
    import tvm

    ctx.tvm_target = tvm.target.Target(target.tvm_target_json(ctx.num_threads))
    defaulted = ctx.tuning is None
    if defaulted:
        ctx.tuning = target.default_tuning()
    fallback = target.fallback_pipeline(ctx.pipeline) if defaulted else None
    # TVM's importer may leave its marks on the proto it reads: the rebuild starts from a copy
    pristine = ctx.model.SerializeToString() if fallback is not None else b""
    try:
        _run_pipeline(target, ctx, only, quiet_failures=fallback is not None)
    except _PhaseFailed as failed:
        if fallback is None:
            raise _phase_error(target, failed.phase, failed.error) from failed.error
        first = ctx.pipeline
        ctx.reset_for_rebuild()
        ctx.model = onnx.load_from_string(pristine)
        ctx.pipeline, ctx.tuning = fallback, None
        try:
            _run_pipeline(target, ctx, only, quiet_failures=False)
        except _PhaseFailed as again:
            raise _phase_error(target, again.phase, again.error) from again.error
        # said once the rebuild worked: a refusal stays one line
        ctx.warn(
            f"{target.name}: the {first} pipeline failed on this model ({failed.phase}: "
            f"{_first_line(failed.error)}); built with the {fallback} pipeline and TVM's default "
            "schedules instead (correct, but slower)"
        )


def _run_pipeline(
    target: Target, ctx: BuildContext, only: tuple[str, ...] | None, *, quiet_failures: bool
) -> None:
    phases = target.phases(ctx.pipeline)
    if ctx.prepost is not None:
        phases = _with_prepost_phase(phases, ctx)
    for phase in phases:
        if only is not None and phase.name not in only:
            continue
        start = time.perf_counter()
        try:
            # TVM's C++ side prints on stderr when a failed legalize unwinds ("BlockBuilder
            # destroyed with remaining blocks!"): noise beside detc's one-line error, or beside
            # a fallback that succeeds
            # (tune keeps stderr: its progress bar draws there)
            with _stderr_held_back(enabled=quiet_failures or phase.name != "tune"):
                summary = phase.run(ctx)
        except DetcError:
            raise
        except Exception as err:
            raise _PhaseFailed(phase.name, err) from err
        seconds = time.perf_counter() - start
        ctx.timings.append((phase.name, seconds, summary))
        ctx.progress(f"{target.name} {phase.name}: {summary} ({seconds:.1f} s)")


def _with_prepost_phase(phases: list[Phase], ctx: BuildContext) -> list[Phase]:
    """``phases`` with the prepost phase (:mod:`detc.targets.prepost.wrap`) just before build:
    after legalize and tune, which must see the network alone."""
    from detc.targets.prepost.wrap import wrap_network

    output_names = [value.name for value in ctx.model.graph.output]
    prepost = Phase(PREPOST_PHASE, lambda context: wrap_network(context, output_names))
    names = [phase.name for phase in phases]
    at = names.index("build") if "build" in names else len(phases)
    return [*phases[:at], prepost, *phases[at:]]


@contextlib.contextmanager
def _stderr_held_back(*, enabled: bool) -> Iterator[None]:
    """Hold back what is written on file descriptor 2 (C++ logs) inside; pass it on only if the
    block succeeds."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if succeeded:
                held.seek(0)
                text = held.read().decode("utf-8", "replace")
                if text:
                    sys.stderr.write(text)


# ---- errors --------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # TVM's messages often start with a traceback banner; the useful line is the last one.
    useful = [line for line in lines if not line.startswith(("File ", "Traceback", "^"))]
    return (useful[-1] if useful else type(err).__name__)[:300]


def _describe_nodes(model: onnx.ModelProto, op_type: str) -> str:
    names = [n.name or f"#{i}" for i, n in enumerate(model.graph.node) if n.op_type == op_type]
    if not names:
        return op_type
    more = f", +{len(names) - 1} more" if len(names) > 1 else ""
    return f"{op_type} (node '{names[0]}'{more})"


#: initializers of these types and at most this many elements are shapes, axes and indices
_INDEX_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
_INDEX_ELEMENTS = 4096


def _index_initializers_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose small int64/int32 initializers are ``Constant`` nodes.

    The importer keeps every initializer as a parameter of main (``keep_params_in_input``), so
    a shape that fold-constants left as an initializer (an Expand's, say) became a runtime value
    and the op's output shape dynamic: TVM then computed a wrong shape without a word.
    """
    index = [
        init
        for init in model.graph.initializer
        if init.data_type in _INDEX_TYPES and np.prod(init.dims, dtype=np.int64) <= _INDEX_ELEMENTS
    ]
    if not index:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = {init.name for init in index}
    kept = [init for init in copy.graph.initializer if init.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    graph_inputs = [v for v in copy.graph.input if v.name not in names]
    del copy.graph.input[:]
    copy.graph.input.extend(graph_inputs)
    constants = [
        onnx.helper.make_node("Constant", [], [init.name], name=f"{init.name}/constant", value=init)
        for init in index
    ]
    nodes = list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend([*constants, *nodes])
    return copy


def _refuse_dynamic_inputs(model: onnx.ModelProto) -> None:
    """A compiled artifact has one input shape (its kernels are scheduled and tuned for it):
    name the inputs with symbolic or unknown dimensions, and the flag that fixes them, before
    TVM's importer fails somewhere inside the graph (e.g. on a Resize of unknown size)."""
    weights = {init.name for init in model.graph.initializer}
    found, suggested = [], []
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in weights or all(d.HasField("dim_value") for d in dims):
            continue
        shown = [str(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
        # a batch of one; other unknown sizes are the user's to choose
        wanted = [
            str(d.dim_value) if d.HasField("dim_value") else "1" if i == 0 else "N"
            for i, d in enumerate(dims)
        ]
        found.append(f"'{value.name}' is {'x'.join(shown)}")
        suggested.append(f"--input-shape {value.name}:{'x'.join(wanted)}")
    if found:
        raise BadInputError(
            f"dynamic input dimensions ({'; '.join(found)}): an artifact is compiled for one "
            f"shape; give it with {' '.join(suggested)} (N: your size)"
        )


def _refuse_unsupported_ops(model: onnx.ModelProto) -> None:
    """Name every node TVM's ONNX importer lacks (op, domain, name; sorted), in one line, before
    it fails on the first one."""
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map
    except ImportError:  # a TVM without this private helper: the importer's own error remains
        return
    known = set(_get_convert_map()) | {"Constant", "If"}
    unsupported = sorted(
        (node.op_type, node.domain or "ai.onnx", node.name or f"#{index}")
        for index, node in enumerate(model.graph.node)
        if node.op_type not in known
    )
    if unsupported:
        nodes = ", ".join(f"{op} ({domain}) '{name}'" for op, domain, name in unsupported)
        count = f"{len(unsupported)} node{'s' if len(unsupported) > 1 else ''}"
        raise UnsupportedModelError(
            f"TVM's ONNX importer does not support {count}: {nodes}; replace or remove these "
            "ops (e.g. move them into post-processing)"
        )


def _import_error(model: onnx.ModelProto, chatter: str, err: Exception) -> DetcError:
    failed = re.search(r"Error converting operator (\w+)", chatter)
    if failed:
        return UnsupportedModelError(
            f"TVM could not import {_describe_nodes(model, failed.group(1))}: {_first_line(err)}"
        )
    return UnsupportedModelError(f"TVM could not import the model: {_first_line(err)}")


def _phase_error(target: Target, phase: str, err: Exception) -> DetcError:
    relax_ops = sorted(set(re.findall(r"relax\.[a-z_][\w.]*", str(err))))
    where = f" (Relax op {', '.join(relax_ops[:3])})" if relax_ops else ""
    return UnsupportedModelError(
        f"{target.name} {phase} failed{where}: {_first_line(err)}; re-run with --debug for TVM's "
        "trace"
    )


# ---- registry ------------------------------------------------------------------------------

_FAMILIES: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: make ``cls`` reachable as ``--target <cls.family>[:variant]``."""
    _FAMILIES[cls.family] = cls
    return cls


def available_targets() -> list[TargetInfo]:
    """Every target name ``--target`` accepts, with what it enables (imports no TVM)."""
    return [info for cls in _FAMILIES.values() for info in cls.infos()]


def resolve_target(name: str) -> Target:
    """``"x86"`` / ``"x86:znver3"`` → a Target; BadInputError listing the known ones."""
    family, _, variant = name.strip().partition(":")
    cls = _FAMILIES.get(family)
    if cls is None:
        known = ", ".join(info.name for info in available_targets())
        raise BadInputError(f"unknown target '{name}'; known targets: {known}")
    return cls.from_variant(variant or None)
