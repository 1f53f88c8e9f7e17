"""An int8 artifact against the float one and onnxruntime, all timed in one interleaved run.

Not a unit test (pytest does not collect it). Issue #7's speed goal is two ratios measured
together: detc int8 / detc tuned fp32 (goal ≤ 0.6) and detc int8 / onnxruntime running the same
QDQ model with its own graph optimizations (goal ≤ 1.0). onnxruntime on the float model is
printed for context. Each round runs every contestant once, the order rotating from round to
round, so drifts of the machine's speed land on all of them alike.

    detc opt yolov5n.onnx -p "<default>,quantize{calib=coco64}" -o y5q.onnx
    detc compile yolov5n.onnx --target x86 --tune -o build/y5t
    detc compile y5q.onnx --target x86 --tune -o build/y5q
    python tests/bench/bench_int8.py --int8 build/y5q --fp32 build/y5t \\
        --qdq y5q.onnx --float yolov5n.onnx --runs 30
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int8", type=Path, required=True, help="artifact of the QDQ model")
    parser.add_argument("--fp32", type=Path, required=True, help="artifact of the float model")
    parser.add_argument("--qdq", type=Path, required=True, help="the QDQ ONNX model")
    parser.add_argument("--float", type=Path, default=None, help="the float ONNX model")
    parser.add_argument(
        "--int8-before",
        type=Path,
        default=None,
        help="another int8 artifact of the same model (e.g. built before a kernel change), "
        "timed in the same rounds",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="rounds (each runs every one)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import onnx_ir as ir

    from detc.compiler.driver import load
    from detc.compiler.reference import ort_session, random_feeds, run_session
    from detc.compiler.verify.tensors import manifest_inputs, read_manifest

    feeds = random_feeds(manifest_inputs(read_manifest(args.int8)))
    contestants: dict[str, Callable[[Any], Any]] = {
        "detc int8": load(args.int8, num_threads=args.threads).run,
        "detc fp32": load(args.fp32, num_threads=args.threads).run,
    }
    if args.int8_before is not None:
        contestants["detc int8 before"] = load(args.int8_before, num_threads=args.threads).run
    models = {"onnxruntime qdq": args.qdq, "onnxruntime fp32": args.float}
    for name, path in models.items():
        if path is not None:
            session = ort_session(ir.load(path), threads=args.threads)
            contestants[name] = functools.partial(run_session, session)

    for run in contestants.values():
        for _ in range(args.warmup):
            run(feeds)
    times: dict[str, list[float]] = {name: [] for name in contestants}
    names = list(contestants)
    for round_index in range(args.runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            contestants[name](feeds)
            times[name].append((time.perf_counter() - started) * 1000.0)

    median = {name: statistics.median(ms) for name, ms in times.items()}
    result = {
        "median_ms": {name: round(ms, 2) for name, ms in median.items()},
        "int8_over_fp32": round(median["detc int8"] / median["detc fp32"], 3),
        "int8_over_onnxruntime_qdq": round(median["detc int8"] / median["onnxruntime qdq"], 3),
        "int8_before_over_fp32": (
            round(median["detc int8 before"] / median["detc fp32"], 3)
            if "detc int8 before" in median
            else None
        ),
        "threads": args.threads,
        "runs": args.runs,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    for name, ms in median.items():
        print(f"{name:<18} median {ms:8.2f} ms")
    print(
        f"detc int8 / detc fp32        {result['int8_over_fp32']:.3f}  (goal <= 0.6)\n"
        f"detc int8 / onnxruntime qdq  {result['int8_over_onnxruntime_qdq']:.3f}  (goal <= 1.0)\n"
        + (
            f"detc int8 before / detc fp32 {result['int8_before_over_fp32']:.3f}\n"
            if result["int8_before_over_fp32"] is not None
            else ""
        )
        + f"{args.threads} threads, {args.runs} rounds, order rotating each round"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
