"""Tuning measured over TVM RPC: a loopback tracker with two servers under one key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.tolerances import FP32_EXACT
from detc.targets import build_artifact, load_artifact
from detc.targets.remote.loopback import local_rpc_server, local_rpc_tracker
from detc.targets.remote.session import RpcDeviceError
from detc.targets.tuning.options import TuningOptions

KEY = "detc-loopback"


def conv_silu(rng: np.random.Generator) -> onnx.ModelProto:
    """One 3×3 convolution (16 → 32 channels) with SiLU: a single tuning task of the template."""
    weight = (rng.standard_normal((32, 16, 3, 3)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(32) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
            helper.make_node("Mul", ["c", "s"], ["y"], name="silu"),
        ],
        "conv_silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 20, 20])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tracker_with_two_servers_measures_candidates_on_both(tmp_path: Path) -> None:
    model = conv_silu(np.random.default_rng(0))
    with (
        local_rpc_tracker() as tracker,
        local_rpc_server(tracker=tracker, key=KEY) as first,
        local_rpc_server(tracker=tracker, key=KEY) as second,
    ):
        manifest = build_artifact(
            model,
            "x86",
            tmp_path / "out",
            manifest_fields={},
            num_threads=2,
            progress=False,
            tuning=TuningOptions(
                trials=8, database=tmp_path / "db", rpc_tracker=tracker.address, rpc_key=KEY
            ),
        )
        served = (first.sessions_served(), second.sessions_served())
    # The runner asks the tracker for a server per candidate, two at a time: both measured.
    assert min(served) >= 1 and sum(served) >= 8, served
    assert manifest["tuning"]["trials"] == 8 and manifest["tuning"]["functions_unscheduled"] == 0
    x = np.random.default_rng(1).standard_normal((1, 16, 20, 20)).astype(np.float32)
    expected = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    np.testing.assert_allclose(
        load_artifact(tmp_path / "out", num_threads=2)(x)["y"],
        expected,
        rtol=FP32_EXACT.rtol,
        atol=FP32_EXACT.atol,
    )


def test_no_server_under_the_key_is_refused_in_one_line(tmp_path: Path) -> None:
    with local_rpc_tracker() as tracker, pytest.raises(RpcDeviceError) as caught:
        build_artifact(
            conv_silu(np.random.default_rng(0)),
            "x86",
            tmp_path / "out",
            manifest_fields={},
            progress=False,
            tuning=TuningOptions(
                trials=4, database=tmp_path / "db", rpc_tracker=tracker.address, rpc_key=KEY
            ),
        )
    message = str(caught.value)
    assert f"key '{KEY}'" in message and "rpc_server" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no artifact left behind
