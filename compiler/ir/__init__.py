"""The pass manager: the pass base classes, the registry of passes (built-in and plugins), text
pipelines that round-trip, and graph statistics. This is the API third-party passes build on."""

from __future__ import annotations

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

__all__ = [
    "DEFAULT_PIPELINE",
    "Candidate",
    "DetcPass",
    "GraphStats",
    "NoMatch",
    "NoOptions",
    "PassResult",
    "Pipeline",
    "PipelineRun",
    "PipelineStep",
    "RewritePass",
    "all_passes",
    "get_pass",
    "graph_stats",
    "parse_pipeline",
    "pipeline_from_config",
    "run_pipeline",
]
