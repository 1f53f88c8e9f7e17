"""Load an artifact directory and run it: ``load_artifact(dir)(images=x)`` → {output name: array}.

An artifact compiled ``--with-preprocess`` takes ``image=``: a uint8 RGB (h, w, 3) array of any
size (its manifest records the shape as ``["h", "w", 3]``); ``--with-nms`` ones return
``boxes``, ``scores``, ``classes`` and ``count`` (rows past ``count`` are zero).

Threads: TVM's CPU thread pool is per calling thread, sized once when first used, from
``TVM_NUM_THREADS`` (else *half* the logical CPUs on x86, assuming hyper-threading: 1 thread on
a 2-core VM without it). So detc sets ``TVM_NUM_THREADS`` to at least the logical CPU count
before the pool exists, then selects the count it wants with ``runtime.config_threadpool``,
again in any other Python thread that runs the model. It also sets ``TVM_BIND_THREADS=0``
(unless the user set it): TVM otherwise pins its workers and the calling thread to cores, and
threads created later by that thread (onnxruntime's pool, during verification) inherit the pin.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError, DetcError
from detc.targets.cpu import detect_host_cpu, host_machine, library_machine, missing_flags
from detc.targets.manifest import MAX_INPUT_BYTES, Artifact, contiguous

__all__ = [
    "CompiledModel",
    "configure_threads",
    "host_machine",
    "library_machine",
    "load_artifact",
]

#: the user's own setting, read before configure_threads() raises it to the pool capacity
_USER_NUM_THREADS = os.environ.get("TVM_NUM_THREADS", "")
_thread_lock = threading.Lock()
#: the TVM pool size configured in each Python thread (dies with the thread, as its pool does)
_this_thread = threading.local()


def configure_threads(num_threads: int) -> int:
    """Make TVM's pool for the calling Python thread use ``num_threads``; returns what it uses."""
    import tvm

    if getattr(_this_thread, "num_threads", None) == num_threads:
        return num_threads
    with _thread_lock:  # os.environ is process-wide
        capacity = max(num_threads, os.cpu_count() or 1)
        current = os.environ.get("TVM_NUM_THREADS", "")
        if not current.isdigit() or int(current) < capacity:
            # Read once per pool, when it is created: it caps every later configuration.
            os.environ["TVM_NUM_THREADS"] = str(capacity)
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        big_cores_mode = 1  # ThreadGroup::kBig: on x86 every core counts as big
        tvm.get_global_func("runtime.config_threadpool")(big_cores_mode, num_threads)
        used = int(tvm.runtime.num_threads())
    _this_thread.num_threads = used
    return used


#: bytes of alignment TVM requires of memory it shares with numpy (DLPack import)
_TVM_ALIGNMENT = 64
#: DLPack's device type of the host CPU (kDLCPU)
_DL_CPU = 1


class CompiledModel:
    """A loaded artifact: ``run({"images": x})`` or ``model(x)`` → {output name: array}."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        vm: Any,
        params: list[Any],
        num_threads: int,
        device: Any,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self._vm = vm
        self._params = params
        self.num_threads = num_threads
        #: where the VM runs (the artifact's target's device)
        self.device = device
        # a GPU's tensors are copied in and out; the CPU's are shared with numpy (DLPack)
        device_type = getattr(device, "dlpack_device_type", lambda: _DL_CPU)
        self._on_host = int(device_type()) == _DL_CPU
        self._inputs: list[dict[str, Any]] = list(manifest["inputs"])
        self._outputs: list[dict[str, Any]] = list(manifest["outputs"])
        #: per input name: the buffer unaligned inputs are copied into (runs are sequential)
        self._staging: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"CompiledModel({str(self.directory)!r}, target={self.manifest['target']['name']!r})"

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec["name"] for spec in self._outputs]

    def _checked_arguments(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:

        missing = [name for name in self.input_names if name not in feeds]
        unknown = [name for name in feeds if name not in self.input_names]
        if missing or unknown:
            raise BadInputError(
                f"{self.directory}: feeds {sorted(feeds)} do not match the model's inputs "
                f"{self.input_names} (missing {missing}, unknown {unknown})"
            )
        arguments = []
        for spec in self._inputs:
            array = np.asarray(feeds[spec["name"]])
            expected = np.dtype(spec["dtype"])
            if array.dtype != expected:
                raise BadInputError(
                    f"input '{spec['name']}' is {array.dtype}, the model expects {expected}: "
                    f"convert it with .astype(np.{expected.name})"
                )
            shape = spec["shape"]
            fits = len(array.shape) == len(shape) and all(
                not isinstance(want, int) or want == got
                for want, got in zip(shape, array.shape, strict=True)
            )
            if not fits:
                raise BadInputError(
                    f"input '{spec['name']}' has shape {list(array.shape)}, the model expects "
                    f"{shape}"
                )
            if array.nbytes > MAX_INPUT_BYTES or 0 in array.shape:
                # the image of an artifact with compiled preprocessing is of any size
                raise BadInputError(
                    f"input '{spec['name']}' has shape {list(array.shape)}: give a non-empty "
                    f"image of at most {MAX_INPUT_BYTES:,} bytes"
                )
            arguments.append(self._device_input(spec["name"], contiguous(array)))
        if self.manifest["calling_convention"] == "inputs+params":
            arguments.extend(self._params)
        return arguments

    def _device_input(self, name: str, array: np.ndarray) -> Any:
        """``array`` as TVM sees it, without a fresh allocation per run: shared in place when it
        is aligned as TVM requires, else copied into a buffer this model keeps for the input
        (a 640x640 image costs ~1 ms to allocate and copy each run; ~4 % of yolov5n)."""
        import tvm

        # a read-only array (an image decoded by Pillow) cannot be shared through DLPack
        shareable = array.flags.writeable and array.ctypes.data % _TVM_ALIGNMENT == 0
        if self._on_host and shareable:
            return tvm.runtime.from_dlpack(array)
        staging = self._staging.get(name)
        if staging is None or tuple(staging.shape) != array.shape:
            staging = tvm.runtime.empty(array.shape, str(array.dtype), self.device)
            self._staging[name] = staging
        staging.copyfrom(array)
        return staging

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on ``feeds`` (every input by name); returns every output by name."""
        arguments = self._checked_arguments(feeds)
        configure_threads(self.num_threads)
        result = self._vm["main"](*arguments)
        values = [result] if hasattr(result, "numpy") else list(result)
        if len(values) != len(self._outputs):
            raise BadInputError(
                f"{self.directory}: model.so returned {len(values)} outputs, the manifest lists "
                f"{len(self._outputs)}; re-run detc compile"
            )
        # Views of the VM's result tensors, not copies: each run returns fresh tensors, which
        # the arrays keep alive. An output that *is* an input (an identity or reshape of it)
        # is copied: the input's memory is the caller's array or a buffer the next run reuses.
        if not self._on_host:
            return {s["name"]: v.numpy() for s, v in zip(self._outputs, values, strict=True)}
        inputs = {np.from_dlpack(a).ctypes.data for a in arguments[: len(self._inputs)]}
        outputs = {}
        for spec, value in zip(self._outputs, values, strict=True):
            view = np.from_dlpack(value)
            outputs[spec["name"]] = view.copy() if view.ctypes.data in inputs else view
        return outputs

    def __call__(self, *arrays: np.ndarray, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """``model(x)`` (inputs in order), ``model(images=x)``, or both mixed."""
        if len(arrays) > len(self.input_names):
            raise BadInputError(
                f"{len(arrays)} positional inputs given; the model takes {self.input_names}"
            )
        positional = dict(zip(self.input_names[: len(arrays)], arrays, strict=True))
        twice = sorted(set(positional) & set(feeds))
        if twice:
            raise BadInputError(f"inputs {twice} given both by position and by name")
        return self.run({**positional, **feeds})

    def latency(
        self, feeds: Mapping[str, np.ndarray], *, repeat: int = 10, warmup: int = 1
    ) -> list[float]:
        """Seconds per run of ``main`` for ``repeat`` runs, timed inside TVM (no numpy copies)."""
        arguments = self._checked_arguments(feeds)
        configure_threads(self.num_threads)
        for _ in range(warmup):
            self._vm["main"](*arguments)
        timer = self._vm.time_evaluator("main", self.device, number=1, repeat=repeat)
        return [float(seconds) for seconds in timer(*arguments).results]


def _check_runs_here(artifact: Artifact) -> None:
    manifest, library = artifact.manifest, artifact.library_path
    built_for = library_machine(library)
    if built_for is None:
        raise BadInputError(f"{library} is not a shared library (ELF); re-run detc compile")
    here = host_machine()
    if built_for != here:
        raise BadInputError(
            f"{library} is a {built_for} library (target {manifest.target_name}) and this "
            f"machine is {here}: run it with `detc verify --emulate` or on a {built_for} board"
        )
    mcpu = manifest.tvm_target.get("mcpu")
    if here == "x86_64" and mcpu:
        lacking = missing_flags(mcpu, detect_host_cpu().flags)
        if lacking:
            raise BadInputError(
                f"{artifact.directory} was built for {mcpu}, which uses CPU features this CPU "
                f"lacks ({', '.join(lacking[:5])}): rebuild with `detc compile --target x86`"
            )


def load_artifact(out_dir: Path, *, num_threads: int | None = None) -> CompiledModel:
    """Load the artifact directory ``out_dir`` for running on this machine (on the device its
    target names: :meth:`Target.device`).

    ``num_threads``: TVM worker threads (default: ``TVM_NUM_THREADS`` if set, else the physical
    cores of this machine). BadInputError, naming the file, when the artifact is missing,
    corrupt, or built for another ISA or for CPU features this machine lacks. The library is
    loaded only once its sha256 matches the manifest's (from a private copy: the file loaded is
    the file checked).
    """
    artifact = Artifact.open(Path(out_dir))
    _check_runs_here(artifact)
    if num_threads is None:
        num_threads = (
            int(_USER_NUM_THREADS)
            if _USER_NUM_THREADS.isdigit()
            else detect_host_cpu().physical_cores
        )
    if num_threads < 1:
        raise BadInputError(f"num_threads must be at least 1, got {num_threads}")

    import tvm
    from tvm import relax

    configure_threads(num_threads)
    device = artifact.target().device()
    params = [tvm.runtime.tensor(array, device) for array in artifact.load_params()]
    library = artifact.library_path
    try:
        # the checked private copy: its constructors run now, and it stays mapped once removed
        with artifact.library_copy() as checked:
            executable = tvm.runtime.load_module(str(checked))
        vm = relax.VirtualMachine(executable, device)
    except DetcError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[-1:] or [type(err).__name__]
        raise BadInputError(
            f"{library} cannot be loaded ({first[0]}); re-run detc compile"
        ) from err
    return CompiledModel(
        artifact.directory, artifact.manifest.as_dict(), vm, params, num_threads, device
    )
