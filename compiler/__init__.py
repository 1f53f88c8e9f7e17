"""detc.compiler — front end, graph IR helpers, pass manager, driver, CLI, benchmarker."""

from __future__ import annotations

from detc.compiler.bench import BenchResult, bench_interleaved
from detc.compiler.driver import CompileResult, compile_model, load, optimize
from detc.compiler.errors import (
    BadInputError,
    CheckFailedError,
    DetcError,
    PassError,
    ToolchainMissingError,
    UnsupportedModelError,
    VerificationMismatchError,
)
from detc.compiler.frontend import LoadedModel, from_torch, load_model, load_onnx, load_pt2
from detc.compiler.ir import (
    DEFAULT_PIPELINE,
    Candidate,
    DetcPass,
    GraphStats,
    NoMatch,
    NoOptions,
    PassResult,
    Pipeline,
    PipelineRun,
    PipelineStep,
    RewritePass,
    all_passes,
    get_pass,
    graph_stats,
    parse_pipeline,
    pipeline_from_config,
    run_pipeline,
)
from detc.compiler.verify import TensorReport, VerificationReport, verify_artifact, verify_tensors

__all__ = [
    "DEFAULT_PIPELINE",
    "BadInputError",
    "BenchResult",
    "Candidate",
    "CheckFailedError",
    "CompileResult",
    "DetcError",
    "DetcPass",
    "GraphStats",
    "LoadedModel",
    "NoMatch",
    "NoOptions",
    "PassError",
    "PassResult",
    "Pipeline",
    "PipelineRun",
    "PipelineStep",
    "RewritePass",
    "TensorReport",
    "ToolchainMissingError",
    "UnsupportedModelError",
    "VerificationMismatchError",
    "VerificationReport",
    "all_passes",
    "bench_interleaved",
    "compile_model",
    "from_torch",
    "get_pass",
    "graph_stats",
    "load",
    "load_model",
    "load_onnx",
    "load_pt2",
    "optimize",
    "parse_pipeline",
    "pipeline_from_config",
    "run_pipeline",
    "verify_artifact",
    "verify_tensors",
]
