"""Run and time artifacts on remote boards over TVM RPC.

Where a board is and how it is reached (``rpc://HOST:PORT``, ``rpc://KEY@HOST:PORT``, bounded
connects): :mod:`detc.targets.remote.session`. The board needs the same apache-tvm and
apache-tvm-ffi versions as this machine, plus the packages of TVM's ``rpc`` extra (cloudpickle,
tornado, psutil): its server starts a helper process through cloudpickle and the tracker runs on
tornado.

One *session* per call: connect, upload ``model.so``, ``load_module`` it there, build a
``relax.VirtualMachine`` on the board's device (the artifact's target's :meth:`Target.device`),
send the parameters once, run every feed set through ``set_input``/``invoke_stateful`` and fetch
its outputs one tensor at a time (over RPC, calling ``main`` directly returns a tuple as an opaque
handle), close. Latency is measured on the board by the VM's ``time_evaluator``, so the network
is not timed.

The RPC server runs whatever a client sends it: the loopback servers of
:mod:`detc.targets.remote.loopback` bind to 127.0.0.1 only. Boards belong on a private network.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from detc.compiler.errors import BadInputError
from detc.targets.context import LIBRARY_FILE
from detc.targets.cpu import library_machine
from detc.targets.manifest import Artifact
from detc.targets.remote.session import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_WAIT_S,
    RpcDevice,
    RpcDeviceError,
    Session,
    as_device,
    connect,
    one_line,
)

logger = logging.getLogger("detc.targets.rpc")
_T = TypeVar("_T")

_REMOTE_LIBRARY = LIBRARY_FILE  # its name in the server's temporary directory
# TVM's ThreadGroup::kBig: on x86 every core counts as big; on big.LITTLE boards, the big cores.
_BIG_CORES = 1


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
        self.session: Session | None = connect(
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
        except BadInputError:  # the artifact's fault, not the board's (e.g. a replaced library)
            raise
        except Exception as err:
            failure = (describe or self._failure)(stage, err)
        raise RpcDeviceError(failure)

    def _failure(self, stage: str, err: BaseException) -> str:
        return (
            f"{self.runner.artifact_dir} failed on {self.runner.device} [{self.served_by}] "
            f"during {stage}: {one_line(err)}"
        )

    def _load_failure(self, stage: str, err: BaseException) -> str:
        library = self.runner.library
        return (
            f"{library} ({library_machine(library) or 'non-ELF'}) cannot be loaded on "
            f"{self.runner.device} [{self.served_by}] ({one_line(err)}): was it compiled for "
            "this board's CPU, with the board's TVM version?"
        )

    def _remote(self) -> Any:
        assert self.session is not None, "the session is closed"
        return self.session.remote

    def _device(self) -> Any:
        return self.runner.target.device(self._remote())

    def _load_library(self) -> None:
        from tvm import relax

        remote = self._remote()
        # a private copy whose sha256 matched the manifest's: the file uploaded is the file checked
        with self.runner.artifact.library_copy() as checked:
            remote.upload(str(checked), _REMOTE_LIBRARY)
        self.vm = relax.VirtualMachine(remote.load_module(_REMOTE_LIBRARY), self._device())

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
        self.params = [tvm.runtime.tensor(p, self._device()) for p in self.runner.params]
        return used

    def _set_inputs(self, inputs: Sequence[np.ndarray]) -> None:
        import tvm

        device = self._device()
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
            "invoke_stateful", self._device(), number=number, repeat=repeat
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
        self.device = as_device(device)
        self.artifact = Artifact.open(self.artifact_dir)
        self.artifact.check_library_digest()
        self.manifest = self.artifact.manifest.as_dict()
        self.library = self.artifact.library_path
        #: the artifact's target: which device of the board its code runs on
        self.target = self.artifact.target()
        if num_threads is not None and num_threads < 1:
            raise BadInputError(f"num_threads must be at least 1, got {num_threads}")
        self.num_threads = num_threads
        self.connect_timeout_s = connect_timeout_s
        self.wait_s = wait_s
        self.output_names = self.artifact.manifest.output_names
        self.params = self.artifact.load_params()
        self.served_by: str | None = None
        self.remote_threads: int | None = None

    def __repr__(self) -> str:
        return f"RpcBatchRunner({str(self.artifact_dir)!r}, {str(self.device)!r})"

    def __call__(
        self, feed_sets: Sequence[Mapping[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        ordered = [
            self.artifact.manifest.ordered_inputs(feeds, i) for i, feeds in enumerate(feed_sets)
        ]
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
        inputs = self.artifact.manifest.ordered_inputs(feeds, 0)
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
