"""bench_interleaved (ABBA) and bench_round_robin (rotating orders): warm-up first, medians, p90
and ratios in JSON; OpenVINO as a contestant (fp32, or the error naming the extra to install)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from detc.compiler.bench import (
    bench_interleaved,
    bench_round_robin,
    openvino_runner,
    require_openvino,
)
from detc.compiler.errors import BadInputError
from detc.compiler.reference import ort_session, run_session


class _Clocked:
    """A runner that records the global call order and 'takes' a fixed time (no sleeping)."""

    def __init__(self, label: str, calls: list[str], ms: float, clock: list[float]) -> None:
        self.label, self.calls, self.ms, self.clock = label, calls, ms, clock

    def __call__(self, feeds: object) -> None:
        self.calls.append(self.label)


def test_runs_are_interleaved_abba_after_warmup() -> None:
    calls: list[str] = []
    a = _Clocked("A", calls, 1.0, [])
    b = _Clocked("B", calls, 2.0, [])
    result = bench_interleaved(a, b, {}, warmup=2, runs=4, progress=False)
    assert calls[:4] == ["A", "B", "A", "B"]  # warm-up, both sides
    assert calls[4:] == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert result.order == calls[4:]
    assert len(result.a_ms) == len(result.b_ms) == 4


def test_ratio_and_json_from_measured_times(monkeypatch) -> None:
    # A fake clock: each runner call advances time by its own cost, so the numbers are known.
    now = [0.0]
    monkeypatch.setattr("detc.compiler.bench.time.perf_counter", lambda: now[0])

    def slow(feeds: object) -> None:
        now[0] += 0.004

    def fast(feeds: object) -> None:
        now[0] += 0.002

    result = bench_interleaved(
        slow, fast, {}, a_name="slow", b_name="fast", threads=2, warmup=1, runs=6, progress=False
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["a"]["name"] == "slow" and data["b"]["name"] == "fast"
    assert np.isclose(data["a"]["median_ms"], 4.0) and np.isclose(data["b"]["median_ms"], 2.0)
    assert np.isclose(data["ratio"], 2.0)
    assert data["threads"] == 2 and data["interleaved"] is True and data["a"]["runs"] == 6
    assert "ratio 2.000" in result.table()


def test_round_robin_visits_every_order_of_three_contestants() -> None:
    calls: list[str] = []
    runners = {name: _Clocked(name, calls, 1.0, []) for name in ("detc", "ort", "ov")}
    result = bench_round_robin(runners, {}, baseline="ort", warmup=1, runs=6, progress=False)
    assert calls[:3] == ["detc", "ort", "ov"]  # warm-up round
    rounds = [tuple(result.order[i : i + 3]) for i in range(0, 18, 3)]
    assert len(set(rounds)) == 6  # all 3! orders, once each
    for position in range(3):
        assert sorted(r[position] for r in rounds) == sorted(["detc", "ort", "ov"] * 2)
    assert all(len(ms) == 6 for ms in result.ms.values())


def test_round_robin_ratios_against_the_baseline_in_json(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr("detc.compiler.bench.time.perf_counter", lambda: now[0])

    def costing(seconds: float):
        def run(feeds: object) -> None:
            now[0] += seconds

        return run

    runners = {"detc": costing(0.003), "onnxruntime": costing(0.004), "openvino": costing(0.002)}
    result = bench_round_robin(
        runners, {}, baseline="onnxruntime", threads=2, warmup=0, runs=4, progress=False
    )
    pairs = [("detc", "onnxruntime"), ("detc", "openvino")]
    data = json.loads(json.dumps(result.to_dict(pairs)))
    by_name = {c["name"]: c for c in data["contestants"]}
    assert np.isclose(by_name["detc"]["ratio_vs_onnxruntime"], 0.75)
    assert np.isclose(by_name["openvino"]["ratio_vs_onnxruntime"], 0.5)
    assert np.isclose(data["ratios"]["detc / openvino"], 1.5)
    assert data["threads"] == 2 and data["interleaved"] is True
    assert "ratio 1.500  (detc / openvino)" in result.table(pairs)


def test_round_robin_refuses_an_unknown_baseline() -> None:
    with pytest.raises(ValueError, match="baseline"):
        bench_round_robin({"a": lambda f: None}, {}, baseline="b", runs=1, progress=False)


def _tiny_conv_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weight = rng.normal(0.0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["n", 8, 16, 16])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(proto, path)
    return path


def test_openvino_runs_the_float_model_in_fp32_like_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    model = _tiny_conv_model(tmp_path / "tiny.onnx")  # dynamic batch: reshaped to the artifact's
    openvino = openvino_runner(model, {"images": (1, 3, 16, 16)}, threads=2)
    run, note = openvino.run, openvino.note
    feeds = {"images": np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)}
    expected = run_session(ort_session(onnx.load(model), threads=1), feeds)["out"]
    found = run(feeds)["out"]
    assert found.shape == (1, 8, 16, 16)
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-5)  # fp32, not bf16
    assert "f32" in note and "LATENCY" in note
    assert f"{openvino.threads} threads" in note
    if len(os.sched_getaffinity(0)) >= 2:
        assert openvino.threads == 2


def test_openvino_refuses_a_model_whose_inputs_differ(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    model = _tiny_conv_model(tmp_path / "tiny.onnx")
    with pytest.raises(BadInputError, match="do not match"):
        openvino_runner(model, {"x": (1, 3, 16, 16)}, threads=1)


def test_without_openvino_the_error_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino → ImportError
    with pytest.raises(BadInputError) as raised:
        require_openvino()
    assert str(raised.value).endswith("pip install 'detc[bench]'")
    assert raised.value.exit_code == 2
