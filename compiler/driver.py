"""The driver: front end → passes → target, as Python functions the CLI verbs are thin over."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from detc.compiler.errors import BadInputError, DetcError
from detc.compiler.frontend import LoadedModel, load_model
from detc.compiler.ir.pass_base import DetcPass
from detc.compiler.ir.pipeline import (
    DEFAULT_PIPELINE,
    PassRecord,
    Pipeline,
    PipelineRun,
    parse_pipeline,
    run_pipeline,
)


def default_threads() -> int:
    """Threads for both detc and onnxruntime when the user gives none: the usable cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def detc_version() -> str:
    """The installed distribution's version (what ``detc --version`` prints)."""
    from importlib.metadata import version

    return version("detc")


def _as_pipeline(pipeline: str | Pipeline | None) -> Pipeline:
    if pipeline is None:
        return parse_pipeline(DEFAULT_PIPELINE)
    return parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline


@dataclass(frozen=True)
class _InstanceKeepingPipeline(Pipeline):
    """A pipeline that remembers the pass objects it ran: their reports (``pass_.report``)
    say what approximate passes decided, e.g. which layers ``quantize`` kept in float."""

    instances: list[DetcPass] = field(default_factory=list, compare=False, repr=False)

    def instantiate(self) -> list[DetcPass]:
        self.instances[:] = super().instantiate()
        return list(self.instances)


def _as_loaded(
    source: str | os.PathLike[str] | LoadedModel,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
) -> LoadedModel:
    if isinstance(source, LoadedModel):
        return source
    if not isinstance(source, (str, os.PathLike)):
        kind = type(source).__name__
        hint = (
            "export it first: detc.from_torch(module, example_inputs)"
            if any(c.__module__.startswith("torch") for c in type(source).__mro__)
            else "give a path to an .onnx or .pt2 file, or a detc.LoadedModel"
        )
        raise BadInputError(f"cannot compile a {kind}: {hint}")
    return load_model(source, input_shapes=input_shapes)


def optimize(
    source: str | os.PathLike[str] | LoadedModel,
    pipeline: str | Pipeline | None = None,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    dump_ir: Path | None = None,
    verify_each: bool = False,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> tuple[LoadedModel, PipelineRun]:
    """Load ``source`` and run ``pipeline`` (default: the exact passes) over it."""
    loaded = _as_loaded(source, input_shapes)
    # Instantiate before loading work starts so a typo in the pipeline fails fast.
    chosen = _InstanceKeepingPipeline(_as_pipeline(pipeline).steps)
    chosen.instantiate()
    run = run_pipeline(
        loaded.model, chosen, dump_ir=dump_ir, verify_each=verify_each, on_pass=on_pass
    )
    loaded.model = run.model
    return loaded, run


@dataclass
class CompileResult:
    manifest: dict[str, Any]
    pipeline_run: PipelineRun
    out_dir: Path


def _model_spec_for(loaded: LoadedModel, proto: Any, spec: Any) -> dict[str, Any] | None:
    """The preprocessing / decoding spec stored in the manifest (explicit, else inferred)."""
    if spec is not None:
        return spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    try:
        from detc.compiler.detection.spec import spec_from_onnx
    except ImportError:
        return None
    try:
        return spec_from_onnx(proto).to_dict()
    except Exception:  # a model that is not an image detector still compiles, without a spec
        return None


def _quantization_record(
    run: PipelineRun, proto: Any
) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
    """What ``detc verify`` needs of an int8 graph: how it was quantized, and the QDQ model.

    Returns the manifest's ``quantization`` entry (None for a float graph) and the files to add
    to the artifact: the compiled graph itself as QDQ ONNX, the *quantized reference* that
    onnxruntime runs beside the artifact. A graph that was QDQ already when loaded (quantized
    elsewhere) is recorded too, with ``origin: "source"``.
    """
    from detc.compiler.verify.quantization import is_quantized
    from detc.passes.quantize.core import QuantizePass, quantized_nodes
    from detc.targets.artifact import QUANTIZED_REFERENCE_FILE

    if not is_quantized(proto):
        return None, {}
    instances = run.pipeline.instances if isinstance(run.pipeline, _InstanceKeepingPipeline) else []
    quantize_runs = [
        (pass_, record)
        for pass_, record in zip(instances, run.records, strict=False)
        if isinstance(pass_, QuantizePass) and pass_.options.mode == "int8" and record.modified
    ]
    record: dict[str, Any]
    if quantize_runs and quantize_runs[-1][0].report is not None:
        pass_, step = quantize_runs[-1]
        opts, report = pass_.options, pass_.report
        assert report is not None
        record = {
            "mode": "int8",
            "origin": "pass",
            "step": step.step,
            "method": report.method,
            "calib_images": report.calib_images,
            "activations": opts.activations,
            "per_channel": opts.per_channel,
            "quantize_outputs": opts.quantize_outputs,
            "max_map_drop": opts.max_map_drop,
            "layers": len(report.layers),
            "quantized": len(report.quantized),
            "kept_float": [
                {"name": d.name, "op_type": d.op_type, "reason": d.reason}
                for d in report.layers
                if not d.quantized
            ],
            # measured by the pass in onnxruntime on the QDQ graph (max_map_drop only)
            "float_map": report.float_map,
            "fully_quantized_map": report.fully_quantized_map,
            "quantized_map": report.quantized_map,
        }
    else:
        done = quantized_nodes(proto)
        weighted = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        record = {
            "mode": "int8",
            "origin": "source",
            "max_map_drop": None,
            "layers": len(weighted),
            "quantized": sum(n.name in done for n in weighted),
            "kept_float": [
                {"name": n.name, "op_type": n.op_type, "reason": "float in the loaded model"}
                for n in weighted
                if n.name not in done
            ],
        }
    payload = proto.SerializeToString()
    record["reference"] = {
        "file": QUANTIZED_REFERENCE_FILE,
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    return record, {QUANTIZED_REFERENCE_FILE: payload}


def _approximate_record(
    run: PipelineRun, proto: Any
) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
    """What ``detc verify`` needs of a float graph that approximate passes changed (prune,
    lowrank): which passes, and the graph they left, kept in the artifact as the reference its
    tensors must match; accuracy is held to the source model under an mAP budget."""
    from detc.targets.artifact import TRANSFORMED_REFERENCE_FILE

    # pass names (a step's options, calibration folders included, are in the manifest's pipeline)
    changed = [r.step.partition("{")[0] for r in run.records if not r.exact and r.modified]
    if not changed:
        return None, {}
    payload = proto.SerializeToString()
    record = {
        "passes": changed,
        "reference": {
            "file": TRANSFORMED_REFERENCE_FILE,
            "sha256": hashlib.sha256(payload).hexdigest(),
        },
    }
    return record, {TRANSFORMED_REFERENCE_FILE: payload}


def compile_model(
    source: str | os.PathLike[str] | LoadedModel,
    *,
    target: str = "x86",
    out_dir: str | os.PathLike[str],
    pipeline: str | Pipeline | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    dump_ir: Path | None = None,
    verify_each: bool = False,
    model_spec: Any = None,
    num_threads: int | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
    progress: bool = True,
    target_options: Mapping[str, Any] | None = None,
    with_preprocess: bool = False,
    with_nms: bool = False,
) -> CompileResult:
    """Compile a model for ``target`` into an artifact directory (written atomically).

    The artifact keeps the float model it was compiled from as ``reference.onnx`` (its sha256
    in the manifest): ``detc verify`` and ``bench`` compare with it by default and never open a
    path outside the artifact. The manifest holds no build times, so that the same model and
    options give a byte-identical artifact.
    """
    from detc.targets import build_artifact, resolve_target
    from detc.targets.artifact import SOURCE_REFERENCE_FILE, check_output_location

    chosen = resolve_target(target)  # a misspelt target fails now, not after minutes of passes
    check_output_location(Path(out_dir))  # so does an -o the build could not write
    loaded = _as_loaded(source, input_shapes)
    prepost = _prepost_request(loaded, model_spec, chosen, with_preprocess, with_nms)
    reference = _float_reference(loaded)
    extra_files = {SOURCE_REFERENCE_FILE: reference}
    loaded, run = optimize(
        loaded,
        pipeline,
        input_shapes=input_shapes,
        dump_ir=dump_ir,
        verify_each=verify_each,
        on_pass=on_pass,
    )
    proto = ir.serde.serialize_model(loaded.model)
    quantization, quantized_files = _quantization_record(run, proto)
    extra_files.update(quantized_files)
    fields: dict[str, Any] = {
        "pipeline": str(run.pipeline),
        "source": {
            # provenance only: nothing reads the model back from there
            "path": str(loaded.path) if loaded.path else None,
            "sha256": loaded.sha256,
            "onnx": SOURCE_REFERENCE_FILE,
            "onnx_sha256": hashlib.sha256(reference).hexdigest(),
        },
        "detc_version": detc_version(),
        "model_spec": _model_spec_for(loaded, proto, model_spec),
        "metadata": loaded.metadata,
        "passes": [_without_times(r.to_dict()) for r in run.records],
    }
    if quantization is not None:
        fields["quantization"] = quantization
    else:
        approximate, transformed_files = _approximate_record(run, proto)
        if approximate is not None:
            fields["approximate"] = approximate
            extra_files.update(transformed_files)
    try:
        manifest = build_artifact(
            proto,
            target,
            Path(out_dir),
            manifest_fields=fields,
            num_threads=num_threads,
            progress=progress,
            extra_files=extra_files,
            **dict(target_options or {}),
            **({"prepost": prepost} if prepost is not None else {}),
        )
    except DetcError as err:
        raise _naming_the_model(err, loaded.path) from err
    return CompileResult(manifest, run, Path(out_dir))


def _prepost_request(
    loaded: LoadedModel, model_spec: Any, target: Any, preprocess: bool, nms: bool
) -> Any:
    """What --with-preprocess / --with-nms ask of the build (None: neither), checked before any
    pass runs: a CPU target, a model spec (given, or inferred from the model), and for NMS one of
    the decoders detc compiles."""
    if not (preprocess or nms):
        return None
    from detc.compiler.detection.spec import ModelSpec, spec_from_onnx
    from detc.targets.context import PrepostRequest
    from detc.targets.prepost.detect import FAMILIES

    flags = " and ".join(
        f for f, on in (("--with-preprocess", preprocess), ("--with-nms", nms)) if on
    )
    if target.device_kind != "cpu":
        raise BadInputError(
            f"{flags}: target {target.name} is not supported (compiled pre/post-processing runs "
            "on the CPU targets x86 and arm); decode on the host with detc's Python path instead"
        )
    spec = model_spec
    if spec is None:
        try:
            spec = spec_from_onnx(ir.serde.serialize_model(loaded.model))
        except BadInputError as err:
            raise BadInputError(
                f"{flags} needs the model's preprocessing and decoder, and none can be inferred "
                f"({err}): give --spec FILE"
            ) from None
    elif not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(dict(spec))
    if nms and spec.decoder not in FAMILIES:
        raise BadInputError(
            f"--with-nms compiles the built-in decoders ({', '.join(FAMILIES)}); the spec's "
            f"decoder is {spec.decoder!r}: drop --with-nms and decode in Python"
        )
    return PrepostRequest(preprocess=preprocess, nms=nms, spec=spec)


def _float_reference(loaded: LoadedModel) -> bytes:
    """The float model as onnxruntime will read it in ``detc verify``: an ONNX source file as
    it is (its external data inlined), else (a .pt2 or torch module, which onnxruntime cannot
    read) the model as exported, before any pass."""
    path = loaded.path
    if path is None or path.suffix.lower() != ".onnx":
        return ir.serde.serialize_model(loaded.model).SerializeToString()
    import onnx

    # the front end checked this file (size, external data confined to its folder): use it only
    # if it still is that file
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != loaded.sha256:
        raise BadInputError(f"{path}: the file changed while detc was reading it; run again")
    proto = onnx.ModelProto.FromString(data)
    if not any(
        onnx.external_data_helper.uses_external_data(tensor)
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
    ):
        return data
    onnx.load_external_data_for_model(proto, str(path.parent))
    return proto.SerializeToString()


def _without_times(record: dict[str, Any]) -> dict[str, Any]:
    """A pass record as the manifest keeps it: without its wall time (which differs on every
    build; the pass table printed while compiling shows it)."""
    return {key: value for key, value in record.items() if key != "seconds"}


def _naming_the_model(err: DetcError, path: Path | None) -> DetcError:
    """``err`` with the model file named first, when its message does not name it already
    (errors of the target's phases speak of TVM's view of the graph, not of the file)."""
    message = str(err)
    if path is None or str(path) in message:
        return err
    try:
        return type(err)(f"{path}: {message}")
    except TypeError:  # an error class with a constructor of its own: as it is
        return err


def load(out_dir: str | os.PathLike[str], *, num_threads: int | None = None) -> Any:
    """A compiled artifact as a Python callable: ``load(OUT)(images=array) -> {name: array}``.

    A bundle (``detc package``'s folder) loads through its own C library, without TVM's
    compiler: :class:`detc.targets.bundle.loader.BundleModel` (also ``.detect(rgb)``); its
    threads come from TVM_NUM_THREADS.
    """
    from detc.targets.bundle.package import BUNDLE_FILE

    if (Path(out_dir) / BUNDLE_FILE).is_file():
        from detc.targets.bundle.loader import BundleError, BundleModel

        try:
            return BundleModel(out_dir)
        except BundleError as err:
            raise BadInputError(str(err)) from None
    from detc.targets import load_artifact

    return load_artifact(Path(out_dir), num_threads=num_threads)
