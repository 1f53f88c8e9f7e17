"""Reaching a board over TVM RPC: device addresses, the tracker's protocol, bounded connects.

Device addresses (``--device``):

    rpc://HOST:PORT          a server started on the board with
                             ``python -m tvm.exec.rpc_server --host <board address> --port PORT``
    rpc://KEY@HOST:PORT      a tracker (``python -m tvm.exec.rpc_tracker``) at HOST:PORT; any free
                             server registered under KEY (``rpc_server --tracker HOST:PORT
                             --key KEY``) runs the work. ``--rpc-tracker HOST:PORT --rpc-key KEY``
                             is the same address: :func:`tracker_device`.

IPv6 hosts go in brackets (``rpc://[fd00::2]:9090``).

Every wait is bounded: the TCP connect (``connect_timeout_s``; TVM's own connect can block for the
OS's two-minute SYN timeout and its tracker client retries refused connections for 60 s) and the
wait for a free server under a tracker key (``wait_s``). Failures are one-line
:class:`RpcDeviceError` messages (exit 2) naming the device and what to check.

A server runs one session at a time: a second client of a busy server (``rpc://HOST:PORT``)
waits until the first is done. Share boards through a tracker, which hands each request a free
server and keeps the others waiting (at most ``wait_s``).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from detc.compiler.errors import BadInputError

LOOPBACK = "127.0.0.1"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_WAIT_S = 300.0
SCHEME = "rpc"
_URL_FORMS = "rpc://HOST:PORT (an RPC server) or rpc://KEY@HOST:PORT (a tracker and a device key)"
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")


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
        return join_host_port(self.host, self.port)

    def __str__(self) -> str:
        user = f"{self.key}@" if self.key is not None else ""
        return f"{SCHEME}://{user}{self.address}"


@dataclass(frozen=True)
class RegisteredServer:
    """One RPC server a tracker knows, as the tracker reports it."""

    key: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_port(port: int | None, text: str) -> int:
    if port is None or not 0 < port < 65536:
        raise BadInputError(f"device '{text}' lacks a port in 1-65535; expected {_URL_FORMS}")
    return port


def split_host_port(text: str, what: str) -> tuple[str, int]:
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
    if parts.scheme != SCHEME or not parts.hostname:
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
    host, port = split_host_port(tracker, "--rpc-tracker")
    if not _KEY_PATTERN.fullmatch(key):
        raise BadInputError(
            f"--rpc-key '{key}' may use only letters, digits, '_', '.' and '-' (e.g. rk3588)"
        )
    return RpcDevice(host, port, key)


def describe(device: RpcDevice) -> str:
    """How messages name ``device``: its URL, or the bare tracker when no key is involved."""
    if device.key == "":
        return f"tracker {device.address}"
    return f"device {device}"


def as_device(device: str | RpcDevice) -> RpcDevice:
    return device if isinstance(device, RpcDevice) else parse_device(device)


# ---- connecting ----------------------------------------------------------------------------


def one_line(err: BaseException) -> str:
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
            f"{describe(device)}: unknown host '{device.host}' ({err.strerror}); check the address"
        ) from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
    raise RpcDeviceError(
        f"{describe(device)}: cannot reach the {what} at {device.address} ({reason}); "
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
            f"{describe(device)}: {device.address} did not answer as a TVM RPC tracker ({err}); "
            f"for an RPC server use rpc://{device.address}"
        ) from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise RpcDeviceError(f"{describe(device)}: {device.address} is not a TVM RPC tracker")
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
    elif tracker.strip().startswith(f"{SCHEME}://"):
        device = parse_device(tracker)
    else:
        device = RpcDevice(*split_host_port(tracker, "tracker"), key="")
    wanted = key if key is not None else device.key or None
    servers = _registered_servers(replace(device, key=device.key or ""), timeout_s)
    return [s for s in servers if wanted is None or s.key == wanted]


@dataclass
class Session:
    remote: Any  # tvm.rpc.RPCSession
    served_by: str  # HOST:PORT of the server that runs the session


def connect(device: RpcDevice, *, connect_timeout_s: float, wait_s: float) -> Session:
    from tvm import rpc

    if not device.via_tracker:
        _probe(device, connect_timeout_s)
        return Session(_rpc_connect(rpc, device, device.host, device.port, ""), device.address)
    host, port, match_key = _request_server(device, connect_timeout_s, wait_s)
    served_by = join_host_port(host, port)
    return Session(_rpc_connect(rpc, device, host, port, match_key), served_by)


def _rpc_connect(rpc: Any, device: RpcDevice, host: str, port: int, key: str) -> Any:
    try:
        return rpc.connect(host, port, key)
    except Exception as err:
        reason = one_line(err)
        address = join_host_port(host, port)
        if "cannot find server that matches key" in reason:
            raise RpcDeviceError(
                f"{describe(device)}: the server at {address} expects a key (it is registered "
                "with a tracker or was started with --key): use rpc://KEY@TRACKER_HOST:TRACKER_PORT"
            ) from None
        # A tracker drops the connection at our RPC magic: seen as either failure, by timing.
        if "RecvAll" in reason or "SendAll" in reason:
            raise RpcDeviceError(
                f"{describe(device)}: {address} did not answer as a TVM RPC server (is it a "
                f"tracker? then use rpc://KEY@{address})"
            ) from None
        raise RpcDeviceError(
            f"{describe(device)}: connecting to {address} failed ({reason}); {_server_hint(device)}"
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
            f"{describe(device)}: no RPC server is registered under key '{device.key}' at tracker "
            f"{device.address} ({known}); start one with `python -m tvm.exec.rpc_server "
            f"--tracker {device.address} --key {device.key}` on the board"
        )
    with contextlib.closing(_open_tracker_socket(device, connect_timeout_s)) as sock:
        sock.settimeout(wait_s)
        try:
            reply = _tracker_call(sock, [base.TrackerCode.REQUEST, device.key, "detc", 1])
        except TimeoutError:
            raise RpcDeviceError(
                f"{describe(device)}: all {len(registered)} server(s) under key '{device.key}' "
                f"stayed busy for {wait_s:g} s; try again later or register more boards"
            ) from None
        except OSError as err:
            raise RpcDeviceError(
                f"{describe(device)}: the tracker dropped the request ({err})"
            ) from None
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == base.TrackerCode.SUCCESS):
        raise RpcDeviceError(f"{describe(device)}: the tracker answered {reply!r} to a request")
    host, port, match_key = reply[1]
    return str(host), int(port), str(match_key)
