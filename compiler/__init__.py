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
from detc.compiler.ir.pass_base import (
    Candidate,
    DetcPass,
    NoMatch,
    NoOptions,
    PassResult,
    RewritePass,
)
from detc.compiler.ir.pipeline import (
    DEFAULT_PIPELINE,
    Pipeline,
    PipelineRun,
    PipelineStep,
    parse_pipeline,
    pipeline_from_config,
    run_pipeline,
)
from detc.compiler.ir.registry import all_passes, get_pass
from detc.compiler.ir.stats import GraphStats, graph_stats
from detc.compiler.verify.tensors import TensorReport, verify_tensors

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
    "verify_tensors",
]
