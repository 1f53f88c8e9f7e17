"""Running artifacts over TVM RPC: device addresses, loopback servers and a tracker, errors.

Every server and tracker here binds 127.0.0.1. Each one imports TVM twice (its main process and
TVM's helper process), so they are module-scoped and started side by side.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.errors import BadInputError, ToolchainMissingError
from detc.compiler.tolerances import FP32_EXACT
from detc.targets import build_artifact
from detc.targets.remote.loopback import LocalRpcServer, LocalRpcTracker, local_rpc_server
from detc.targets.remote.rpc import rpc_batch_runner, rpc_time
from detc.targets.remote.session import (
    RpcDevice,
    RpcDeviceError,
    parse_device,
    tracker_device,
    tracker_servers,
)

if TYPE_CHECKING:
    from tvm.rpc import RPCSession

KEY = "detc-test"
INPUT_SHAPE = (1, 3, 8, 8)


# ---- device addresses (no TVM) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rpc://192.168.1.20:9090", RpcDevice("192.168.1.20", 9090)),
        ("rpc://board.local:9090/", RpcDevice("board.local", 9090)),
        ("rpc://rk3588@10.0.0.5:9190", RpcDevice("10.0.0.5", 9190, "rk3588")),
        ("  rpc://[fd00::2]:9090 ", RpcDevice("fd00::2", 9090)),
    ],
)
def test_parse_device_accepts_servers_and_trackers(url: str, expected: RpcDevice) -> None:
    device = parse_device(url)
    assert device == expected
    assert device.via_tracker == (expected.key is not None)
    assert parse_device(str(device)) == device  # str() gives back a URL


@pytest.mark.parametrize(
    "url",
    [
        "192.168.1.20:9090",  # no scheme
        "tcp://192.168.1.20:9090",
        "rpc://192.168.1.20",  # no port
        "rpc://192.168.1.20:0",
        "rpc://192.168.1.20:70000",
        "rpc://192.168.1.20:port",
        "rpc://192.168.1.20:9090/models",
        "rpc://rk3588@192.168.1.20:9090?tracker",
        "rpc://a key@192.168.1.20:9090",
        "rpc://",
    ],
)
def test_parse_device_rejects_other_forms_with_the_expected_one(url: str) -> None:
    with pytest.raises(BadInputError) as info:
        parse_device(url)
    message = str(info.value)
    assert "\n" not in message
    assert url.strip() in message
    assert "rpc://" in message


def test_tracker_flags_make_the_same_device_as_the_url() -> None:
    assert tracker_device("10.0.0.5:9190", "rk3588") == parse_device("rpc://rk3588@10.0.0.5:9190")
    with pytest.raises(BadInputError, match="--rpc-tracker"):
        tracker_device("10.0.0.5", "rk3588")
    with pytest.raises(BadInputError, match="--rpc-key"):
        tracker_device("10.0.0.5:9190", "rk 3588")


def test_local_servers_register_only_with_loopback_trackers() -> None:
    with pytest.raises(ValueError, match="loopback"):
        LocalRpcServer(tracker="192.168.1.20:9190", key=KEY)


# ---- fixtures --------------------------------------------------------------------------------


def _tiny_detector_head() -> onnx.ModelProto:
    """Conv → Relu and Conv → Sigmoid: two outputs, so the VM returns a tuple."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
        helper.make_node("Sigmoid", ["c"], ["z"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8]),
        ],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass
class Artifact:
    directory: Path
    model: onnx.ModelProto

    def reference(self, x: np.ndarray) -> dict[str, np.ndarray]:
        session = ort.InferenceSession(
            self.model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return dict(zip(["y", "z"], session.run(None, {"x": x}), strict=True))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    model = _tiny_detector_head()
    out = tmp_path_factory.mktemp("rpc") / "head"
    build_artifact(model, "x86", out, manifest_fields={}, progress=False, report=lambda _: None)
    return Artifact(out, model)


@dataclass
class Farm:
    """A loopback tracker with two servers registered under KEY."""

    tracker: LocalRpcTracker
    servers: tuple[LocalRpcServer, LocalRpcServer]

    @property
    def device(self) -> RpcDevice:
        return self.tracker.device(KEY)

    def sessions(self) -> list[int]:
        return [server.sessions_served() for server in self.servers]

    def hold(self) -> RPCSession:
        """A session on one of the servers, taken with TVM's own tracker client."""
        from tvm import rpc

        return rpc.connect_tracker(self.tracker.host, self.tracker.port).request(KEY)


@pytest.fixture(scope="module")
def farm() -> Iterator[Farm]:
    tracker = LocalRpcTracker()
    servers: list[LocalRpcServer] = []
    try:
        tracker.wait_ready()
        servers = [LocalRpcServer(tracker=tracker, key=KEY) for _ in range(2)]
        for server in servers:
            server.wait_ready()
        yield Farm(tracker, (servers[0], servers[1]))
    finally:
        for server in servers:
            server.stop()
        tracker.stop()


def _input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(INPUT_SHAPE).astype(np.float32)


def _assert_matches_onnxruntime(
    artifact: Artifact, feeds: list[np.ndarray], outputs: list[dict[str, np.ndarray]]
) -> None:
    assert len(outputs) == len(feeds)
    for x, got in zip(feeds, outputs, strict=True):
        expected = artifact.reference(x)
        assert sorted(got) == ["y", "z"]
        for name, value in expected.items():
            assert got[name].shape == value.shape
            np.testing.assert_allclose(got[name], value, rtol=FP32_EXACT.rtol, atol=FP32_EXACT.atol)


def _closed_port() -> socket.socket:
    """A socket bound to a loopback port without listening: connections to it are refused."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    return holder


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- a server, directly --------------------------------------------------------------------


def test_direct_server_runs_the_artifact_like_onnxruntime_and_stops_cleanly(
    artifact: Artifact,
) -> None:
    feeds = [_input(1), _input(2)]
    with local_rpc_server() as server:
        runner = rpc_batch_runner(artifact.directory, server.url)
        outputs = runner([{"x": x} for x in feeds])
        assert runner.served_by == server.address
        assert server.sessions_served() == 1  # both feed sets in one session
        group, log = server.process_group, server.log_path
        assert _group_alive(group) and log.is_file()
    _assert_matches_onnxruntime(artifact, feeds, outputs)
    assert not _group_alive(group)  # server, TVM's helper process and session processes
    assert not log.parent.exists()


# ---- a tracker with two servers ------------------------------------------------------------


def test_tracker_lists_both_servers_under_the_key(farm: Farm) -> None:
    listed = tracker_servers(farm.tracker.address, KEY)
    assert sorted(s.port for s in listed) == sorted(s.port for s in farm.servers)
    assert {s.key for s in listed} == {KEY}
    assert tracker_servers(farm.tracker.address, "no-such-key") == []
    assert tracker_servers(str(farm.device)) == listed


def test_tracker_hands_out_the_second_server_while_the_first_is_held(
    artifact: Artifact, farm: Farm
) -> None:
    before = farm.sessions()
    held = farm.hold()
    try:
        runner = rpc_batch_runner(artifact.directory, str(farm.device), wait_s=60)
        x = _input(3)
        outputs = runner([{"x": x}])
    finally:
        del held
        gc.collect()
    _assert_matches_onnxruntime(artifact, [x], outputs)
    served = [after - start for after, start in zip(farm.sessions(), before, strict=True)]
    assert served == [1, 1]  # one session each: the held one and the runner's
    assert runner.served_by in {server.address for server in farm.servers}


def test_sessions_are_released_after_each_call(artifact: Artifact, farm: Farm) -> None:
    # Three calls on two servers: a session left open by a call would make the third wait.
    runner = rpc_batch_runner(artifact.directory, farm.device, wait_s=30)
    x = _input(4)
    for _ in range(3):
        _assert_matches_onnxruntime(artifact, [x], runner([{"x": x}]))


def test_rpc_time_returns_positive_milliseconds(artifact: Artifact, farm: Farm) -> None:
    times = rpc_time(artifact.directory, str(farm.device), {"x": _input(5)}, number=3, repeat=4)
    assert len(times) == 4
    assert all(np.isfinite(t) and 0 < t < 1000 for t in times)


def test_busy_servers_time_out_with_one_line(artifact: Artifact, farm: Farm) -> None:
    held = [farm.hold(), farm.hold()]
    try:
        runner = rpc_batch_runner(artifact.directory, farm.device, wait_s=1.0)
        started = time.monotonic()
        with pytest.raises(RpcDeviceError, match="busy") as info:
            runner([{"x": _input(6)}])
        assert time.monotonic() - started < 15
    finally:
        del held
        gc.collect()
    assert "\n" not in str(info.value)
    assert f"all 2 server(s) under key '{KEY}'" in str(info.value)


def test_unknown_key_names_the_registered_ones(artifact: Artifact, farm: Farm) -> None:
    device = farm.tracker.device("no-such-board")
    with pytest.raises(RpcDeviceError, match=rf"keys registered there: {KEY}") as info:
        rpc_batch_runner(artifact.directory, device)([{"x": _input(7)}])
    assert "--key no-such-board" in str(info.value)


def test_tracker_and_server_addresses_swapped_are_explained(artifact: Artifact, farm: Farm) -> None:
    with pytest.raises(RpcDeviceError, match="did not answer as a TVM RPC server"):
        rpc_batch_runner(artifact.directory, f"rpc://{farm.tracker.address}")([{"x": _input(8)}])
    server = farm.servers[0]
    with pytest.raises(RpcDeviceError, match="did not answer as a TVM RPC tracker"):
        rpc_batch_runner(artifact.directory, f"rpc://{KEY}@{server.address}")([{"x": _input(8)}])


def test_feeds_are_checked_before_connecting(artifact: Artifact) -> None:
    with _closed_port() as holder:
        device = f"rpc://127.0.0.1:{holder.getsockname()[1]}"
        runner = rpc_batch_runner(artifact.directory, device)
        with pytest.raises(BadInputError, match="'x' is float64"):
            runner([{"x": _input(9).astype(np.float64)}])


# ---- unreachable devices -------------------------------------------------------------------


@pytest.mark.parametrize("via_tracker", [False, True])
def test_refused_connection_is_one_line_naming_the_device(
    artifact: Artifact, via_tracker: bool
) -> None:
    with _closed_port() as holder:
        port = holder.getsockname()[1]
        url = f"rpc://{KEY}@127.0.0.1:{port}" if via_tracker else f"rpc://127.0.0.1:{port}"
        started = time.monotonic()
        with pytest.raises(BadInputError) as info:
            rpc_batch_runner(artifact.directory, url)([{"x": _input(10)}])
        elapsed = time.monotonic() - started
    message = str(info.value)
    assert "\n" not in message
    assert url in message and "connection refused" in message
    expected_command = "tvm.exec.rpc_tracker" if via_tracker else "tvm.exec.rpc_server"
    assert f"python -m {expected_command}" in message and f"--port {port}" in message
    assert elapsed < 5  # TVM's tracker client alone would retry for 60 s


# ---- the wrong board -----------------------------------------------------------------------


def test_library_for_another_isa_is_refused_by_the_board(
    tmp_path: Path, artifact: Artifact, farm: Farm
) -> None:
    try:
        build_artifact(
            artifact.model,
            "arm",
            tmp_path / "arm",
            manifest_fields={},
            progress=False,
            report=lambda _: None,
        )
    except ToolchainMissingError as err:
        pytest.skip(f"no aarch64 cross compiler: {err}")
    with pytest.raises(RpcDeviceError, match=r"\(aarch64\) cannot be loaded on rpc://") as info:
        rpc_batch_runner(tmp_path / "arm", farm.device, wait_s=60)([{"x": _input(11)}])
    assert "\n" not in str(info.value)
    # The failed session was released: with one server held, the other still takes work.
    held = farm.hold()
    try:
        x = _input(12)
        runner = rpc_batch_runner(artifact.directory, farm.device, wait_s=30)
        _assert_matches_onnxruntime(artifact, [x], runner([{"x": x}]))
    finally:
        del held
        gc.collect()
