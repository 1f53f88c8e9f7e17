"""Loopback TVM RPC servers and trackers, for tests: ``python -m tvm.exec.rpc_server`` /
``rpc_tracker`` bound to 127.0.0.1, each in a process group of its own that ``stop()`` ends.

The RPC server runs whatever a client sends it: these bind to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from detc.compiler.errors import ToolchainMissingError
from detc.targets.remote.session import (
    LOOPBACK,
    SCHEME,
    RpcDevice,
    split_host_port,
    tracker_servers,
)

_BIND_LINE = re.compile(r"bind to 127\.0\.0\.1:(\d+)")
_PORT_SPAN = 200  # ports TVM may try from the start port on, when the caller gives none


def _require_modules(*names: str) -> None:
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ToolchainMissingError(
            f"TVM's RPC server/tracker need {', '.join(missing)}: pip install {' '.join(missing)} "
            "(the apache-tvm[rpc] extra)"
        )


def _port_range(port: int | None) -> tuple[int, int]:
    if port is not None:
        return port, port + 1
    # Random start ports keep concurrent test runs from racing for the same port.
    start = random.randrange(20000, 60000 - _PORT_SPAN)
    return start, start + _PORT_SPAN


def _tracker_address(tracker: str | LocalRpcTracker) -> str:
    address = tracker.address if isinstance(tracker, LocalRpcTracker) else tracker
    host, port = split_host_port(address, "tracker")
    if host != LOOPBACK:
        raise ValueError(f"local servers register only with a loopback tracker, not {address}")
    return f"{host}:{port}"


class _LocalProcess:
    """A ``python -m tvm.exec.<module>`` process group bound to 127.0.0.1, with its log."""

    def __init__(self, module: str, arguments: list[str], port: int | None) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="detc-rpc-"))
        self.log_path = self.log_dir / f"{module}.log"
        self.module = module
        start, end = _port_range(port)
        command = [
            sys.executable,
            "-m",
            f"tvm.exec.{module}",
            "--host",
            LOOPBACK,
            "--port",
            str(start),
            "--port-end",
            str(end),
            *arguments,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            # A process group of its own: TVM's server runs in a helper process and forks one
            # more per session; stop() signals the whole group.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.port = 0

    @property
    def pid(self) -> int:
        return self._process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_bound(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            found = _BIND_LINE.search(self.log_text())
            if found:
                self.port = int(found.group(1))
                return self.port
            if self._process.poll() is not None:
                break
            time.sleep(0.1)
        tail = " | ".join(self.log_text().strip().splitlines()[-2:])
        state = "exited" if self._process.poll() is not None else "timed out"
        self.stop()
        raise RuntimeError(f"tvm.exec.{self.module} {state} before binding 127.0.0.1: {tail}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Signal the whole group (TERM, then KILL if it lingers) and wait until it is gone."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, sig)
            if self._wait_group_gone(timeout_s):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=timeout_s)
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def _wait_group_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._process.poll()  # reap the leader: a zombie still counts as a group member
            try:
                os.killpg(self._process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False


def _wait_accepting(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing accepts connections on 127.0.0.1:{port}")


class LocalRpcTracker:
    """``python -m tvm.exec.rpc_tracker`` on 127.0.0.1 (for tests)."""

    def __init__(self, port: int | None = None) -> None:
        _require_modules("cloudpickle", "tornado")
        self._process = _LocalProcess("rpc_tracker", [], port)
        self.host = LOOPBACK

    @property
    def process_group(self) -> int:
        """The id of its process group (its main process, TVM's helper, session processes)."""
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """Its stdout/stderr, removed with it on stop()."""
        return self._process.log_path

    @property
    def port(self) -> int:
        return self._process.port

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def device(self, key: str) -> RpcDevice:
        return RpcDevice(LOOPBACK, self.port, key)

    def wait_ready(self, timeout_s: float = 120.0) -> LocalRpcTracker:
        deadline = time.monotonic() + timeout_s
        _wait_accepting(self._process.wait_bound(deadline), deadline)
        return self

    def stop(self) -> None:
        self._process.stop()


class LocalRpcServer:
    """``python -m tvm.exec.rpc_server`` on 127.0.0.1 (for tests), optionally registered with
    a loopback tracker under ``key``."""

    def __init__(
        self,
        port: int | None = None,
        tracker: str | LocalRpcTracker | None = None,
        key: str | None = None,
    ) -> None:
        _require_modules("cloudpickle")
        if (tracker is None) != (key is None):
            raise ValueError("give both tracker and key, or neither")
        self.tracker = _tracker_address(tracker) if tracker is not None else None
        self.key = key
        arguments = ["--tracker", self.tracker, "--key", key] if self.tracker and key else []
        self._process = _LocalProcess("rpc_server", arguments, port)
        self.host = LOOPBACK

    @property
    def process_group(self) -> int:
        """The id of its process group (its main process, TVM's helper, session processes)."""
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """Its stdout/stderr, removed with it on stop()."""
        return self._process.log_path

    @property
    def port(self) -> int:
        return self._process.port

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """The direct address; a server registered with a tracker is reached through it."""
        return f"{SCHEME}://{self.address}"

    def sessions_served(self) -> int:
        """Sessions this server has accepted so far (from its log)."""
        return self._process.log_text().count("connected from")

    def wait_ready(self, timeout_s: float = 120.0) -> LocalRpcServer:
        deadline = time.monotonic() + timeout_s
        port = self._process.wait_bound(deadline)
        if self.tracker is None:
            _wait_accepting(port, deadline)  # a direct server ignores a bare connect
            return self
        # Probing a tracked server would make it re-register; ask the tracker instead.
        tracker = RpcDevice(*split_host_port(self.tracker, "tracker"), key=self.key)
        while time.monotonic() < deadline:
            if any(s.port == port for s in tracker_servers(tracker)):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"RPC server 127.0.0.1:{port} never registered with {self.tracker}")

    def stop(self) -> None:
        self._process.stop()


@contextlib.contextmanager
def local_rpc_tracker(
    port: int | None = None, *, startup_timeout_s: float = 120.0
) -> Iterator[LocalRpcTracker]:
    """A loopback RPC tracker for the ``with`` block; killed (whole process group) on exit."""
    tracker = LocalRpcTracker(port)
    try:
        yield tracker.wait_ready(startup_timeout_s)
    finally:
        tracker.stop()


@contextlib.contextmanager
def local_rpc_server(
    port: int | None = None,
    tracker: str | LocalRpcTracker | None = None,
    key: str | None = None,
    *,
    startup_timeout_s: float = 120.0,
) -> Iterator[LocalRpcServer]:
    """A loopback RPC server for the ``with`` block (registered with ``tracker`` under ``key``
    when given); killed (whole process group) on exit."""
    server = LocalRpcServer(port, tracker, key)
    try:
        yield server.wait_ready(startup_timeout_s)
    finally:
        server.stop()
