"""Where detc loses time against OpenVINO, layer by layer, on the same float model and threads.

Not a unit test (pytest does not collect it). Runs a compiled x86 artifact with a TVM VM
instrument that times every call (kernels and VM builtins), and OpenVINO fp32 on the artifact's
reference.onnx with ``PERF_COUNT=YES`` (per-node ``profiling_info``), alternating the two, then
groups both the same way:

- convolutions by shape (``conv3x3 s2 64→128 @40x40``; output channels rounded up to a
  multiple of 16, as detc's blocked layout pads 255 to 256), summed over repeats of a shape;
- what follows the last convolution on every path (no convolution downstream of it) as
  ``decode`` (the detection head's reshape/transpose/sigmoid/split/concat);
- the rest by kind: concat, pool, resize, layout (OpenVINO's Reorder, detc's layout_transform),
  eltwise (an Add OpenVINO did not fuse), vm (detc's allocations and shape checks), other.

Each call's time is its median over ``--runs`` runs. Instrumented runs are slower than plain ones
(a Python callback around each call, ~5 µs); the plain medians are printed beside them.

    python tests/bench/bench_layers.py build/yolov5n --threads 2 --runs 20 [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHANNEL_BLOCK = 16


@dataclass
class Call:
    """One timed call of a run, and what it reads from."""

    name: str
    kind: str  # "conv", "concat", ..., the group before the decode rule
    key: str  # the group key ("conv3x3 s1 16→16 @160x160", "concat", ...)
    inputs: list[int] = field(default_factory=list)  # indices of the calls producing its inputs
    conv: bool = False


def conv_key(cin: int, cout: int, kh: int, kw: int, stride: int, h: int, w: int) -> str:
    padded = -(-cout // CHANNEL_BLOCK) * CHANNEL_BLOCK
    return f"conv{kh}x{kw} s{stride} {cin}→{padded} @{h}x{w}"


def mark_decode(calls: list[Call]) -> None:
    """Calls with no convolution downstream become ``decode``."""
    reaches_conv = [False] * len(calls)
    for index in range(len(calls) - 1, -1, -1):
        if calls[index].conv or reaches_conv[index]:
            for producer in calls[index].inputs:
                reaches_conv[producer] = True
    for index, call in enumerate(calls):
        if not call.conv and not reaches_conv[index] and call.kind != "vm":
            call.key = "decode"


# ---- detc ------------------------------------------------------------------------------------


def detc_kind(name: str) -> str:
    if name.startswith("vm.builtin") or name.startswith("vm."):
        return "vm"
    # A resize fused with the concat after it (and the unblock/re-block around both) counts as
    # resize: the layout conversions and the interpolation are its cost, not the copy.
    for word, kind in (
        ("conv2d", "conv"),
        ("resize", "resize"),
        ("concatenate", "concat"),
        ("pool", "pool"),
        ("layout_transform", "layout"),
    ):
        if word in name:
            return kind
    return "other"


def detc_conv_key(shapes: list[tuple[int, ...]]) -> str:
    """From a blocked conv's arguments: data (NCHW or NCHWc), weight OIHWio or OIHW, output."""
    data, output = shapes[0], shapes[-1]
    blocked = next((s for s in shapes[1:] if len(s) == 6), None)
    if blocked is not None:
        cin, cout, kh, kw = blocked[1] * blocked[4], blocked[0] * blocked[5], blocked[2], blocked[3]
    else:
        cout, cin, kh, kw = next(s for s in shapes[1:] if len(s) == 4)
    out_channels = output[1] * output[4] if len(output) == 5 else output[1]
    cout = max(cout, out_channels)
    h, w = output[2], output[3]
    return conv_key(cin, cout, kh, kw, max(1, round(data[2] / h)), h, w)


class DetcProfile:
    """The artifact in a TVM VM with an instrument timing each call."""

    def __init__(self, artifact: Path, threads: int) -> None:
        import tvm
        from tvm import relax

        from detc.targets.manifest import Artifact
        from detc.targets.runtime import configure_threads

        self.tvm = tvm
        configure_threads(threads)
        opened = Artifact.open(artifact)
        device = tvm.cpu()
        with opened.library_copy() as library:
            executable = tvm.runtime.load_module(str(library))
        self.vm = relax.VirtualMachine(executable, device)
        self.params = [tvm.runtime.tensor(a, device) for a in opened.load_params()]
        self.with_params = opened.manifest.calling_convention == "inputs+params"
        self.input_names = [spec.name for spec in opened.manifest.inputs]
        self.calls: list[Call] | None = None
        self.times: list[float] = []

    def arguments(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        inputs = [self.tvm.runtime.tensor(feeds[name]) for name in self.input_names]
        return inputs + (self.params if self.with_params else [])

    def run_plain(self, arguments: list[Any]) -> float:
        self.vm.set_instrument(None)
        started = time.perf_counter()
        self.vm["main"](*arguments)
        return time.perf_counter() - started

    def run_profiled(self, arguments: list[Any]) -> list[float]:
        """Seconds of every call; the first run also records names, shapes and data flow."""
        times: list[float] = []
        names: list[str] = []
        shapes: list[list[tuple[int, ...]]] = []
        pointers: list[list[int]] = []
        fresh: set[int] = set()  # tensors allocated since the last kernel: its outputs
        started = [0.0]

        def instrument(func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
            now = time.perf_counter()
            if before:
                started[0] = now
                return 0
            times.append(now - started[0])
            if self.calls is None:
                tensors = [a for a in args if hasattr(a, "data_ptr")]
                names.append(symbol)
                shapes.append([tuple(int(d) for d in t.shape) for t in tensors])
                pointers.append([t.data_ptr() for t in tensors])
                if hasattr(ret, "data_ptr"):
                    fresh.add(ret.data_ptr())
            return 0

        self.vm.set_instrument(instrument)
        self.vm["main"](*arguments)
        self.vm.set_instrument(None)
        if self.calls is None:
            self.calls = self._calls(names, shapes, pointers, fresh)
        return times

    @staticmethod
    def _calls(
        names: list[str],
        shapes: list[list[tuple[int, ...]]],
        pointers: list[list[int]],
        allocated: set[int],
    ) -> list[Call]:
        calls = []
        writer: dict[int, int] = {}
        for index, (name, arg_shapes, ptrs) in enumerate(zip(names, shapes, pointers, strict=True)):
            kind = detc_kind(name)
            call = Call(name, kind, kind)
            if kind == "conv":
                call.conv, call.key = True, detc_conv_key(arg_shapes)
            if kind != "vm" and ptrs:
                # destination passing: the last argument is written; so is any allocated one
                # not yet written (a kernel with several outputs)
                outputs = {ptrs[-1]} | {p for p in ptrs if p in allocated and p not in writer}
                call.inputs = sorted({writer[p] for p in ptrs if p in writer and p not in outputs})
                for p in outputs:
                    writer[p] = index
            calls.append(call)
        mark_decode(calls)
        return calls


# ---- OpenVINO -------------------------------------------------------------------------------

OV_KINDS = {
    "Convolution": "conv",
    "Concat": "concat",
    "MaxPool": "pool",
    "Pooling": "pool",
    "Interpolate": "resize",
    "Reorder": "layout",
    "Subgraph": "eltwise",
    "Eltwise": "eltwise",
}


class OpenVinoProfile:
    def __init__(self, model: Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(
            core.read_model(str(model)),
            "CPU",
            {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": "f32",
                "PERF_COUNT": True,
            },
        )
        self.request = compiled.create_infer_request()
        self.runtime = compiled.get_runtime_model()
        self.calls: list[Call] | None = None
        self.names: list[str] = []

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[float, list[float]]:
        started = time.perf_counter()
        self.request.infer(feeds)
        wall = time.perf_counter() - started
        executed = [p for p in self.request.profiling_info if str(p.status).endswith("EXECUTED")]
        if self.calls is None:
            self.names = [p.node_name for p in executed]
            self.calls = self._calls(executed)
        by_name = {p.node_name: p.real_time.total_seconds() for p in executed}
        return wall, [by_name.get(name, 0.0) for name in self.names]

    def _calls(self, executed: Sequence[Any]) -> list[Call]:
        ops = {op.get_friendly_name(): op for op in self.runtime.get_ordered_ops()}
        index_of = {p.node_name: i for i, p in enumerate(executed)}
        calls = []
        for p in executed:
            kind = OV_KINDS.get(p.node_type, "other")
            call = Call(p.node_name, kind, kind)
            op = ops.get(p.node_name)
            if op is not None:
                sources = [
                    op.input(i).get_source_output().get_node() for i in range(op.get_input_size())
                ]
                call.inputs = sorted(
                    index_of[s.get_friendly_name()]
                    for s in sources
                    if s.get_friendly_name() in index_of
                )
                if kind == "conv":
                    data, weight = (op.input(i).get_partial_shape() for i in range(2))
                    out = op.output(0).get_partial_shape()
                    cout, cin, kh, kw = (d.get_length() for d in weight)
                    h, w = out[2].get_length(), out[3].get_length()
                    stride = max(1, round(data[2].get_length() / h))
                    call.conv, call.key = True, conv_key(cin, cout, kh, kw, stride, h, w)
            calls.append(call)
        mark_decode(calls)
        return calls


# ---- the comparison -------------------------------------------------------------------------


def grouped(calls: list[Call], times: np.ndarray) -> dict[str, tuple[float, int]]:
    """key → (ms, number of calls), from per-call median seconds."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for call, seconds in zip(calls, times, strict=True):
        totals[call.key][0] += seconds * 1000.0
        totals[call.key][1] += 1
    return {key: (ms, int(n)) for key, (ms, n) in totals.items()}


def compare(
    detc: dict[str, tuple[float, int]], openvino: dict[str, tuple[float, int]]
) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(detc) | set(openvino)):
        d_ms, d_n = detc.get(key, (0.0, 0))
        o_ms, o_n = openvino.get(key, (0.0, 0))
        rows.append(
            {
                "group": key,
                "detc_ms": round(d_ms, 3),
                "openvino_ms": round(o_ms, 3),
                "gap_ms": round(d_ms - o_ms, 3),
                "detc_calls": d_n,
                "openvino_calls": o_n,
            }
        )
    return sorted(rows, key=lambda r: -r["gap_ms"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="an x86 artifact folder (detc compile)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    from detc.compiler.reference import random_feeds
    from detc.compiler.verify.runner import manifest_inputs, read_manifest

    manifest = read_manifest(args.artifact)
    reference = args.artifact / manifest["source"]["onnx"]
    feeds = random_feeds(manifest_inputs(manifest))
    detc = DetcProfile(args.artifact, args.threads)
    openvino = OpenVinoProfile(reference, args.threads)
    arguments = detc.arguments(feeds)
    for _ in range(3):  # warm-up
        detc.run_plain(arguments)
        openvino.run(feeds)
    detc_runs: list[list[float]] = []
    ov_runs: list[list[float]] = []
    detc_wall: list[float] = []
    ov_wall: list[float] = []
    steps: list[Callable[[], None]] = [
        lambda: detc_runs.append(detc.run_profiled(arguments)),
        lambda: detc_wall.append(detc.run_plain(arguments)),
        lambda: _append_ov(openvino, feeds, ov_wall, ov_runs),
    ]
    for i in range(args.runs):
        for step in steps if i % 2 == 0 else steps[::-1]:
            step()
    assert detc.calls is not None and openvino.calls is not None
    detc_groups = grouped(detc.calls, np.median(np.array(detc_runs), axis=0))
    ov_groups = grouped(openvino.calls, np.median(np.array(ov_runs), axis=0))
    rows = compare(detc_groups, ov_groups)
    detc_sum = sum(ms for ms, _ in detc_groups.values())
    ov_sum = sum(ms for ms, _ in ov_groups.values())
    print(
        f"{args.artifact}: {len(detc.calls)} detc calls, {len(openvino.calls)} OpenVINO nodes, "
        f"{args.threads} threads, {args.runs} runs each (medians)"
    )
    # Per-call medians drop the calls a run lost to a stall (a thread descheduled by another
    # process); the median of each run's own sum keeps them. A large difference between the two
    # means the machine is busy, and the table shows kernel speed, not what a run costs.
    detc_run_sum = float(np.median(np.sum(detc_runs, axis=1))) * 1000
    ov_run_sum = float(np.median(np.sum(ov_runs, axis=1))) * 1000
    print(
        f"detc     plain {np.median(detc_wall) * 1000:7.2f} ms; calls: sum of per-call medians "
        f"{detc_sum:7.2f} ms, median per-run sum {detc_run_sum:7.2f} ms (instrumented)"
    )
    print(
        f"OpenVINO plain {np.median(ov_wall) * 1000:7.2f} ms; nodes: sum of per-node medians "
        f"{ov_sum:7.2f} ms, median per-run sum {ov_run_sum:7.2f} ms (fp32, PERF_COUNT on)"
    )
    print(f"\n{'group':<34} {'detc ms':>8} {'OV ms':>8} {'gap ms':>8} {'calls':>7}")
    for row in rows:
        print(
            f"{row['group']:<34} {row['detc_ms']:>8.3f} {row['openvino_ms']:>8.3f} "
            f"{row['gap_ms']:>8.3f} {row['detc_calls']:>3}/{row['openvino_calls']:<3}"
        )
    print(f"\ntop {args.top} gaps (detc − OpenVINO):")
    for row in rows[: args.top]:
        print(f"  {row['gap_ms']:+7.3f} ms  {row['group']}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "artifact": str(args.artifact),
                    "threads": args.threads,
                    "runs": args.runs,
                    "detc_plain_ms": float(np.median(detc_wall) * 1000),
                    "detc_sum_ms": detc_sum,
                    "detc_run_sum_ms": detc_run_sum,
                    "openvino_wall_ms": float(np.median(ov_wall) * 1000),
                    "openvino_sum_ms": ov_sum,
                    "openvino_run_sum_ms": ov_run_sum,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


def _append_ov(
    openvino: OpenVinoProfile,
    feeds: dict[str, np.ndarray],
    wall: list[float],
    runs: list[list[float]],
) -> None:
    seconds, per_node = openvino.run(feeds)
    wall.append(seconds)
    runs.append(per_node)


if __name__ == "__main__":
    sys.exit(main())
