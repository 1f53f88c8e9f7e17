"""Run and time artifacts on remote boards over TVM RPC; loopback servers for tests.

Device addresses (``--device``):

    rpc://HOST:PORT          a server started on the board with
                             ``python -m tvm.exec.rpc_server --host <board address> --port PORT``
    rpc://KEY@HOST:PORT      a tracker (``python -m tvm.exec.rpc_tracker``) at HOST:PORT; any free
                             server registered under KEY (``rpc_server --tracker HOST:PORT
                             --key KEY``) runs the work. ``--rpc-tracker HOST:PORT --rpc-key KEY``
                             is the same address: :func:`tracker_device`.

IPv6 hosts go in brackets (``rpc://[fd00::2]:9090``). The board needs the same apache-tvm and
apache-tvm-ffi versions as this machine, plus the packages of TVM's ``rpc`` extra (cloudpickle,
tornado, psutil): its server starts a helper process through cloudpickle and the tracker runs on
tornado.

One *session* per call: connect, upload ``model.so``, ``load_module`` it there, build a
``relax.VirtualMachine`` on the board's CPU, send the parameters once, run every feed set through
``set_input``/``invoke_stateful`` and fetch its outputs one tensor at a time (over RPC, calling
``main`` directly returns a tuple as an opaque handle), close. Latency is measured on the board by
the VM's ``time_evaluator``, so the network is not timed.

Every wait is bounded: the TCP connect (``connect_timeout_s``; TVM's own connect can block for the
OS's two-minute SYN timeout and its tracker client retries refused connections for 60 s) and the
wait for a free server under a tracker key (``wait_s``). Failures are one-line
:class:`RpcDeviceError` messages (exit 2) naming the device and what to check.

A server runs one session at a time: a second client of a busy server (``rpc://HOST:PORT``)
waits until the first is done. Share boards through a tracker, which hands each request a free
server and keeps the others waiting (at most ``wait_s``).

The RPC server runs whatever a client sends it: :func:`local_rpc_server` and
:func:`local_rpc_tracker` bind to 127.0.0.1 only. Boards belong on a private network.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from detc.compiler.errors import BadInputError, ToolchainMissingError
from detc.targets.artifact import read_manifest, sha256_of
from detc.targets.remote.emulator import _load_params, _ordered_feed
from detc.targets.runtime import library_machine

logger = logging.getLogger("detc.targets.rpc")
_T = TypeVar("_T")

LOOPBACK = "127.0.0.1"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_WAIT_S = 300.0
_SCHEME = "rpc"
_URL_FORMS = "rpc://HOST:PORT (an RPC server) or rpc://KEY@HOST:PORT (a tracker and a device key)"
_REMOTE_LIBRARY = "model.so"
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")
# TVM's ThreadGroup::kBig: on x86 every core counts as big; on big.LITTLE boards, the big cores.
_BIG_CORES = 1


class RpcDeviceError(BadInputError):
    """A board could not be reached, refused the artifact, or failed while running it (exit 2)."""


# ---- addresses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RpcDevice:
    """Where to run: an RPC server (``key`` None) or a tracker plus a device key."""

    host: str
    port: int
    key: str | None = None

    @property
    def via_tracker(self) -> bool:
        return self.key is not None

    @property
    def address(self) -> str:
        """``HOST:PORT`` (IPv6 hosts in brackets)."""
        return _join_host_port(self.host, self.port)

    def __str__(self) -> str:
        user = f"{self.key}@" if self.key is not None else ""
        return f"{_SCHEME}://{user}{self.address}"


@dataclass(frozen=True)
class RegisteredServer:
    """One RPC server a tracker knows, as the tracker reports it."""

    key: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return _join_host_port(self.host, self.port)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_port(port: int | None, text: str) -> int:
    if port is None or not 0 < port < 65536:
        raise BadInputError(f"device '{text}' lacks a port in 1-65535; expected {_URL_FORMS}")
    return port


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[v6]:PORT`` → (host, port); BadInputError naming ``what``."""
    try:
        parts = urlsplit(f"//{text.strip()}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None or parts.username is not None or parts.path:
        raise BadInputError(f"{what} '{text}' is not HOST:PORT (e.g. 192.168.1.20:9190)")
    return host, port


def parse_device(url: str) -> RpcDevice:
    """``rpc://HOST:PORT`` → a server; ``rpc://KEY@HOST:PORT`` → a tracker and device key.

    BadInputError, with the expected forms, for anything else.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # a port that is not a number, an unbalanced bracket
        raise BadInputError(
            f"device '{url}' is not a device address; expected {_URL_FORMS}"
        ) from None
    if parts.scheme != _SCHEME or not parts.hostname:
        raise BadInputError(f"device '{url}' is not a device address; expected {_URL_FORMS}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password:
        raise BadInputError(
            f"device '{url}' has extra parts (path, ?query, #fragment or password); "
            f"expected {_URL_FORMS}"
        )
    port = _check_port(port, url)
    key = parts.username
    if key is not None and not _KEY_PATTERN.fullmatch(key):
        raise BadInputError(
            f"device key '{key}' in '{url}' may use only letters, digits, '_', '.' and '-'"
        )
    return RpcDevice(parts.hostname, port, key)


def tracker_device(tracker: str, key: str) -> RpcDevice:
    """The device of ``--rpc-tracker HOST:PORT --rpc-key KEY``."""
    host, port = _split_host_port(tracker, "--rpc-tracker")
    if not _KEY_PATTERN.fullmatch(key):
        raise BadInputError(
            f"--rpc-key '{key}' may use only letters, digits, '_', '.' and '-' (e.g. rk3588)"
        )
    return RpcDevice(host, port, key)


def _describe(device: RpcDevice) -> str:
    """How messages name ``device``: its URL, or the bare tracker when no key is involved."""
    if device.key == "":
        return f"tracker {device.address}"
    return f"device {device}"


def _as_device(device: str | RpcDevice) -> RpcDevice:
    return device if isinstance(device, RpcDevice) else parse_device(device)


# ---- connecting ----------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """The useful line of a TVM error (they start with banners and end with the reason)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "["))]
    return (useful[-1] if useful else type(err).__name__)[:300]


def _server_hint(device: RpcDevice) -> str:
    if device.via_tracker:
        return (
            f"is `python -m tvm.exec.rpc_tracker --host <address> --port {device.port}` running "
            f"there and reachable from this machine?"
        )
    return (
        f"is `python -m tvm.exec.rpc_server --host <board address> --port {device.port}` running "
        "on the board and reachable from this machine?"
    )


def _tcp_connect(device: RpcDevice, timeout_s: float) -> socket.socket:
    """A TCP connection to the device's address, or a one-line error within ``timeout_s``."""
    what = "tracker" if device.via_tracker else "RPC server"
    try:
        return socket.create_connection((device.host, device.port), timeout=timeout_s)
    except ConnectionRefusedError:
        reason = "connection refused"
    except TimeoutError:
        reason = f"no answer within {timeout_s:g} s"
    except socket.gaierror as err:
        raise RpcDeviceError(
            f"{_describe(device)}: unknown host '{device.host}' ({err.strerror}); check the address"
        ) from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
    raise RpcDeviceError(
        f"{_describe(device)}: cannot reach the {what} at {device.address} ({reason}); "
        f"{_server_hint(device)}"
    )


def _probe(device: RpcDevice, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when the server is unreachable: TVM's C++ connect has no
    timeout of its own. A server treats a connection closed before the handshake as a no-op."""
    _tcp_connect(device, timeout_s).close()


def _open_tracker_socket(device: RpcDevice, timeout_s: float) -> socket.socket:
    from tvm.rpc import base

    sock = _tcp_connect(device, timeout_s)
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except OSError as err:
        sock.close()
        raise RpcDeviceError(
            f"{_describe(device)}: {device.address} did not answer as a TVM RPC tracker ({err}); "
            f"for an RPC server use rpc://{device.address}"
        ) from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise RpcDeviceError(f"{_describe(device)}: {device.address} is not a TVM RPC tracker")
    return sock


def _tracker_call(sock: socket.socket, message: list[Any]) -> Any:
    from tvm.rpc import base

    base.sendjson(sock, message)
    return base.recvjson(sock)


def _registered_servers(device: RpcDevice, timeout_s: float) -> list[RegisteredServer]:
    from tvm.rpc import base

    with contextlib.closing(_open_tracker_socket(device, timeout_s)) as sock:
        try:
            reply = _tracker_call(sock, [base.TrackerCode.SUMMARY])
        except OSError as err:
            raise RpcDeviceError(f"tracker {device.address}: summary failed ({err})") from None
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == base.TrackerCode.SUCCESS):
        raise RpcDeviceError(f"tracker {device.address} answered {reply!r} to a summary request")
    servers = []
    for info in reply[1].get("server_info", []):
        server_key = str(info.get("key", "")).partition(":")[2]  # "server:rk3588" → "rk3588"
        host, port = info.get("addr", (None, None))
        servers.append(RegisteredServer(server_key, str(host), int(port)))
    return sorted(servers, key=lambda s: (s.key, s.host, s.port))


def tracker_servers(
    tracker: str | RpcDevice,
    key: str | None = None,
    *,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> list[RegisteredServer]:
    """The servers registered with ``tracker`` ("HOST:PORT", ``rpc://KEY@HOST:PORT`` or an
    RpcDevice) under ``key`` (default: the device's key; every key when neither is given)."""
    if isinstance(tracker, RpcDevice):
        device = tracker
    elif tracker.strip().startswith(f"{_SCHEME}://"):
        device = parse_device(tracker)
    else:
        device = RpcDevice(*_split_host_port(tracker, "tracker"), key="")
    wanted = key if key is not None else device.key or None
    servers = _registered_servers(replace(device, key=device.key or ""), timeout_s)
    return [s for s in servers if wanted is None or s.key == wanted]


@dataclass
class _Session:
    remote: Any  # tvm.rpc.RPCSession
    served_by: str  # HOST:PORT of the server that runs the session


def _connect(device: RpcDevice, *, connect_timeout_s: float, wait_s: float) -> _Session:
    from tvm import rpc

    if not device.via_tracker:
        _probe(device, connect_timeout_s)
        return _Session(_rpc_connect(rpc, device, device.host, device.port, ""), device.address)
    host, port, match_key = _request_server(device, connect_timeout_s, wait_s)
    served_by = _join_host_port(host, port)
    return _Session(_rpc_connect(rpc, device, host, port, match_key), served_by)


def _rpc_connect(rpc: Any, device: RpcDevice, host: str, port: int, key: str) -> Any:
    try:
        return rpc.connect(host, port, key)
    except Exception as err:
        reason = _one_line(err)
        address = _join_host_port(host, port)
        if "cannot find server that matches key" in reason:
            raise RpcDeviceError(
                f"{_describe(device)}: the server at {address} expects a key (it is registered "
                "with a tracker or was started with --key): use rpc://KEY@TRACKER_HOST:TRACKER_PORT"
            ) from None
        # A tracker drops the connection at our RPC magic: seen as either failure, by timing.
        if "RecvAll" in reason or "SendAll" in reason:
            raise RpcDeviceError(
                f"{_describe(device)}: {address} did not answer as a TVM RPC server (is it a "
                f"tracker? then use rpc://KEY@{address})"
            ) from None
        raise RpcDeviceError(
            f"{_describe(device)}: connecting to {address} failed ({reason}); "
            f"{_server_hint(device)}"
        ) from None


def _request_server(
    device: RpcDevice, connect_timeout_s: float, wait_s: float
) -> tuple[str, int, str]:
    """Ask the tracker for a free server under ``device.key``: (host, port, match key).

    Done with the tracker's wire protocol (``tvm.rpc.base``) rather than ``TrackerSession``,
    whose request waits forever for a free server and hides which server it picked.
    """
    from tvm.rpc import base

    everything = _registered_servers(device, connect_timeout_s)
    registered = [s for s in everything if s.key == device.key]
    if not registered:
        others = sorted({s.key for s in everything})
        known = (
            f"keys registered there: {', '.join(others)}" if others else "no server is registered"
        )
        raise RpcDeviceError(
            f"{_describe(device)}: no RPC server is registered under key '{device.key}' at tracker "
            f"{device.address} ({known}); start one with `python -m tvm.exec.rpc_server "
            f"--tracker {device.address} --key {device.key}` on the board"
        )
    with contextlib.closing(_open_tracker_socket(device, connect_timeout_s)) as sock:
        sock.settimeout(wait_s)
        try:
            reply = _tracker_call(sock, [base.TrackerCode.REQUEST, device.key, "detc", 1])
        except TimeoutError:
            raise RpcDeviceError(
                f"{_describe(device)}: all {len(registered)} server(s) under key '{device.key}' "
                f"stayed busy for {wait_s:g} s; try again later or register more boards"
            ) from None
        except OSError as err:
            raise RpcDeviceError(
                f"{_describe(device)}: the tracker dropped the request ({err})"
            ) from None
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == base.TrackerCode.SUCCESS):
        raise RpcDeviceError(f"{_describe(device)}: the tracker answered {reply!r} to a request")
    host, port, match_key = reply[1]
    return str(host), int(port), str(match_key)


# ---- running -------------------------------------------------------------------------------


def _fetch_outputs(get_arity: Any, get_output: Any, *index: int) -> list[Any]:
    """Every output tensor of the last ``invoke_stateful("main")``, nested tuples flattened.

    ``VirtualMachine.get_outputs`` does the same with a self-referencing closure, a reference
    cycle that keeps the VM, and with it the RPC session and the board, alive until the garbage
    collector happens to run.
    """
    arity = int(get_arity("main", *index))
    if arity == -1:
        return [get_output("main", *index)]
    return [leaf for i in range(arity) for leaf in _fetch_outputs(get_arity, get_output, *index, i)]


class _RemoteModel:
    """One RPC session with the artifact loaded on the board: its VM and parameters there.

    Remote objects (module, VM, tensors) each hold the session; it closes, and a tracker hands
    the board to the next client, only when the last of them is freed. So remote work happens
    in methods whose frames die on return (:meth:`_guarded` turns their exceptions into
    messages before raising, so no traceback keeps such a frame alive), and :meth:`close`
    drops the rest and collects cycles.
    """

    def __init__(self, runner: RpcBatchRunner) -> None:
        self.runner = runner
        self.session: _Session | None = _connect(
            runner.device, connect_timeout_s=runner.connect_timeout_s, wait_s=runner.wait_s
        )
        self.served_by = self.session.served_by
        logger.info("device %s: session on %s", runner.device, self.served_by)
        self.vm: Any = None
        self.params: list[Any] = []
        self.threads: int | None = None
        try:
            self._guarded("loading", self._load_library, self._load_failure)
            self.threads = self._guarded("sending parameters", self._send_params)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _RemoteModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.vm = None
        self.params = []
        self.session = None
        gc.collect()

    def run(self, inputs: Sequence[np.ndarray], label: str) -> list[np.ndarray]:
        return self._guarded(label, lambda: self._run_once(inputs))

    def time(self, inputs: Sequence[np.ndarray], number: int, repeat: int) -> list[float]:
        return self._guarded("timing", lambda: self._time_once(inputs, number, repeat))

    # ---- the remote work ------------------------------------------------------------------

    def _guarded(
        self,
        stage: str,
        work: Callable[[], _T],
        describe: Callable[[str, BaseException], str] | None = None,
    ) -> _T:
        failure = None
        try:
            return work()
        except Exception as err:
            failure = (describe or self._failure)(stage, err)
        raise RpcDeviceError(failure)

    def _failure(self, stage: str, err: BaseException) -> str:
        return (
            f"{self.runner.artifact_dir} failed on {self.runner.device} [{self.served_by}] "
            f"during {stage}: {_one_line(err)}"
        )

    def _load_failure(self, stage: str, err: BaseException) -> str:
        library = self.runner.library
        return (
            f"{library} ({library_machine(library) or 'non-ELF'}) cannot be loaded on "
            f"{self.runner.device} [{self.served_by}] ({_one_line(err)}): was it compiled for "
            "this board's CPU, with the board's TVM version?"
        )

    def _remote(self) -> Any:
        assert self.session is not None, "the session is closed"
        return self.session.remote

    def _load_library(self) -> None:
        from tvm import relax

        remote = self._remote()
        remote.upload(str(self.runner.library), _REMOTE_LIBRARY)
        self.vm = relax.VirtualMachine(remote.load_module(_REMOTE_LIBRARY), remote.cpu())

    def _send_params(self) -> int:
        import tvm

        remote = self._remote()
        wanted = self.runner.num_threads
        if wanted is not None:
            remote.get_function("runtime.config_threadpool")(_BIG_CORES, wanted)
        used = int(remote.get_function("runtime.NumThreads")())
        if wanted is not None and used != wanted:
            logger.warning(
                "device %s runs %d TVM threads, not the %d asked for (the board's server caps "
                "it: set TVM_NUM_THREADS before starting rpc_server)",
                self.runner.device,
                used,
                wanted,
            )
        self.params = [tvm.runtime.tensor(p, remote.cpu()) for p in self.runner.params]
        return used

    def _set_inputs(self, inputs: Sequence[np.ndarray]) -> None:
        import tvm

        device = self._remote().cpu()
        arguments = [tvm.runtime.tensor(value, device) for value in inputs]
        # set_input/invoke_stateful: over RPC, calling main directly returns a tuple of outputs
        # as an opaque handle.
        self.vm.set_input("main", *arguments, *self.params)

    def _run_once(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._set_inputs(inputs)
        self.vm.invoke_stateful("main")
        module = self.vm.module
        outputs = _fetch_outputs(module["get_output_arity"], module["get_output"])
        return [tensor.numpy() for tensor in outputs]

    def _time_once(self, inputs: Sequence[np.ndarray], number: int, repeat: int) -> list[float]:
        self._set_inputs(inputs)
        timer = self.vm.time_evaluator(
            "invoke_stateful", self._remote().cpu(), number=number, repeat=repeat
        )
        return [float(seconds) * 1e3 for seconds in timer("main").results]


class RpcBatchRunner:
    """``runner([feeds, ...])`` → one ``{output name: array}`` per feed set, run on ``device``.

    The artifact and device address are checked when the runner is made; the board is reached
    on each call (one session per call). ``served_by`` is the server of the last call and
    ``remote_threads`` the TVM threads it ran with.
    """

    def __init__(
        self,
        artifact_dir: Path,
        device: str | RpcDevice,
        *,
        num_threads: int | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.device = _as_device(device)
        self.manifest = read_manifest(self.artifact_dir)
        self.library = self.artifact_dir / self.manifest["library"]
        if not self.library.is_file():
            raise BadInputError(f"{self.library} is missing; re-run detc compile")
        digest = self.manifest.get("library_sha256")
        if digest and sha256_of(self.library) != digest:
            raise BadInputError(
                f"{self.library} does not match its manifest (corrupt or replaced); "
                "re-run detc compile"
            )
        convention = self.manifest["calling_convention"]
        if convention not in ("inputs+params", "inputs"):
            raise BadInputError(
                f"{self.artifact_dir / 'manifest.json'}: unknown calling_convention "
                f"{convention!r}; re-run detc compile"
            )
        if num_threads is not None and num_threads < 1:
            raise BadInputError(f"num_threads must be at least 1, got {num_threads}")
        self.num_threads = num_threads
        self.connect_timeout_s = connect_timeout_s
        self.wait_s = wait_s
        self.output_names = [spec["name"] for spec in self.manifest["outputs"]]
        self.params = _load_params(self.artifact_dir, self.manifest)
        self.served_by: str | None = None
        self.remote_threads: int | None = None

    def __repr__(self) -> str:
        return f"RpcBatchRunner({str(self.artifact_dir)!r}, {str(self.device)!r})"

    def __call__(
        self, feed_sets: Sequence[Mapping[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        ordered = [_ordered_feed(feeds, self.manifest, i) for i, feeds in enumerate(feed_sets)]
        results = []
        with self._open() as model:
            for index, inputs in enumerate(ordered):
                arrays = model.run(inputs, f"feed set {index}")
                if len(arrays) != len(self.output_names):
                    raise RpcDeviceError(
                        f"{self.library} returned {len(arrays)} outputs on {self.device}, the "
                        f"manifest lists {len(self.output_names)}; re-run detc compile"
                    )
                results.append(dict(zip(self.output_names, arrays, strict=True)))
        return results

    def time(
        self, feeds: Mapping[str, np.ndarray], *, number: int = 10, repeat: int = 10
    ) -> list[float]:
        """``repeat`` milliseconds, each the mean of ``number`` runs of ``main``, timed on the
        board after one discarded warm-up run."""
        if number < 1 or repeat < 1:
            raise BadInputError(f"number and repeat must be at least 1, got {number}, {repeat}")
        inputs = _ordered_feed(feeds, self.manifest, 0)
        with self._open() as model:
            return model.time(inputs, number, repeat)

    def _open(self) -> _RemoteModel:
        model = _RemoteModel(self)
        self.served_by = model.served_by
        self.remote_threads = model.threads
        return model


def rpc_batch_runner(
    artifact_dir: Path,
    device: str | RpcDevice,
    *,
    num_threads: int | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    wait_s: float = DEFAULT_WAIT_S,
) -> RpcBatchRunner:
    """A runner for the artifact in ``artifact_dir`` on the board ``device``: call it with a list
    of feed sets (``{input name: array}``), get one ``{output name: array}`` per set."""
    return RpcBatchRunner(
        artifact_dir,
        device,
        num_threads=num_threads,
        connect_timeout_s=connect_timeout_s,
        wait_s=wait_s,
    )


def rpc_time(
    artifact_dir: Path,
    device: str | RpcDevice,
    feeds: Mapping[str, np.ndarray],
    *,
    number: int = 10,
    repeat: int = 10,
    num_threads: int | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    wait_s: float = DEFAULT_WAIT_S,
) -> list[float]:
    """Latency of the artifact on the board: ``repeat`` values in milliseconds, each the mean of
    ``number`` runs (take the median)."""
    runner = RpcBatchRunner(
        artifact_dir,
        device,
        num_threads=num_threads,
        connect_timeout_s=connect_timeout_s,
        wait_s=wait_s,
    )
    return runner.time(feeds, number=number, repeat=repeat)


# ---- loopback servers for tests ------------------------------------------------------------

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
    host, port = _split_host_port(address, "tracker")
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
        return f"{_SCHEME}://{self.address}"

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
        tracker = RpcDevice(*_split_host_port(self.tracker, "tracker"), key=self.key)
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
