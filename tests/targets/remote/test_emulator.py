"""The aarch64 emulation environment runs what sort, argsort and TopK lower to
(``tvm.contrib.sort.*``, in libtvm_runtime_extra.so), which libtvm_runtime.so alone lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.errors import ToolchainMissingError
from detc.compiler.reference import ort_session, run_session
from detc.targets.remote import toolchain


def _arm_tools_missing() -> str | None:
    toolchain.clear_toolchain_cache()
    try:
        toolchain.find_aarch64_cross_compiler(require_cxx=True)
    except ToolchainMissingError as error:
        return str(error)
    return None if toolchain.find_qemu_aarch64() is not None else "no qemu-aarch64 (qemu-user)"


def _topk_model() -> onnx.ModelProto:
    """scores (1, 64) → the 5 best (TopK) and the scores sorted descending (a full TopK)."""
    graph = helper.make_graph(
        [
            helper.make_node("TopK", ["scores", "five"], ["best", "best_index"], axis=1),
            helper.make_node("TopK", ["scores", "all"], ["sorted", "order"], axis=1),
        ],
        "topk",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 64])],
        [
            helper.make_tensor_value_info("best", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("best_index", TensorProto.INT64, [1, 5]),
            helper.make_tensor_value_info("sorted", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("order", TensorProto.INT64, [1, 64]),
        ],
        [
            numpy_helper.from_array(np.array([5], np.int64), "five"),
            numpy_helper.from_array(np.array([64], np.int64), "all"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.skipif(_arm_tools_missing() is not None, reason=str(_arm_tools_missing()))
def test_topk_runs_under_emulation(tmp_path: Path) -> None:
    from detc.targets import TuningOptions, build_artifact
    from detc.targets.remote.emulator import ensure_emulation_env, run_emulated

    try:
        env = ensure_emulation_env()
    except ToolchainMissingError as error:  # e.g. no network for the aarch64 wheels
        pytest.skip(str(error))
    assert (env / "lib" / "libtvm_runtime_extra.so").is_file()
    model = _topk_model()
    artifact = tmp_path / "topk-arm"
    build_artifact(
        model, "arm", artifact, manifest_fields={}, progress=False,
        tuning=TuningOptions(tune=False, layout="plain"),
    )  # fmt: skip
    scores = np.random.default_rng(0).permutation(64).astype(np.float32).reshape(1, 64)
    outputs = run_emulated(artifact, {"scores": scores})
    expected = run_session(ort_session(model), {"scores": scores})
    for name in ("best", "best_index", "sorted", "order"):
        np.testing.assert_array_equal(outputs[name], expected[name], err_msg=name)
