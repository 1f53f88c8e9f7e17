"""A MetaSchedule builder whose worker processes live for the whole tuning run.

TVM's ``LocalBuilder`` starts a fresh process pool for every batch, and its build function
imports ``tvm.s_tir.tensor_intrin`` (every CUDA tensor intrinsic parsed from TVMScript): 27 s to
more than a minute per process on these cores, so every candidate hit the timeout. The workers
here start once, import nothing beyond TVM (detc's schedules use no tensor intrinsics), and
compile each candidate into a shared library, so the runner (local or over RPC) only loads it.
A candidate that hangs in LLVM is killed after ``timeout_s`` and its worker replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

DEFAULT_TIMEOUT_S = 60.0


def _quiet_worker() -> None:
    """Worker initializer: candidates compile single-threaded, leaving the cores to others."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")


def build_candidate(mod: Any, target: Any, artifact_dir: str, cross_compiler: str | None) -> str:
    """Compile one scheduled IRModule into ``<artifact_dir>/<unique>.so``; returns the path."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    library = tvm.tirx.build(mod, target=target)
    fd, path = tempfile.mkstemp(prefix="candidate-", suffix=".so", dir=artifact_dir)
    os.close(fd)
    options: dict[str, Any] = {}
    if cross_compiler:
        from tvm.support import cc

        options["fcompile"] = cc.cross_compiler(cross_compiler)
    library.export_library(path, **options)
    return path


@derived_object
class PersistentBuilder(PyBuilder):
    """Builds candidates in ``max_workers`` long-lived processes (see the module docstring)."""

    def __init__(
        self,
        max_workers: int,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        cross_compiler: str | None = None,
    ) -> None:
        super().__init__()
        self.max_workers = max_workers
        self.timeout_s = timeout_s
        self.cross_compiler = cross_compiler
        self.artifact_dir = tempfile.mkdtemp(prefix="detc-candidates-")
        self._pool = PopenPoolExecutor(
            max_workers=max_workers, timeout=timeout_s, initializer=_quiet_worker
        )

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        jobs = [
            (item.mod, item.target, self.artifact_dir, self.cross_compiler) for item in build_inputs
        ]
        results: list[BuilderResult] = []
        for outcome in self._pool.map_with_error_catching(lambda job: build_candidate(*job), jobs):
            if outcome.status == StatusKind.COMPLETE:
                results.append(BuilderResult(str(outcome.value), None))
            elif outcome.status == StatusKind.TIMEOUT:
                results.append(
                    BuilderResult(None, f"build timed out after {self.timeout_s:g} s (killed)")
                )
            else:
                results.append(BuilderResult(None, f"build failed: {outcome.value}"))
        return results

    def shutdown(self) -> None:
        """Stop the workers and delete every candidate library."""
        self._pool.shutdown()
        shutil.rmtree(self.artifact_dir, ignore_errors=True)


def remove_artifact(path: str | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)
