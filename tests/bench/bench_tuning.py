"""Tuned detc against onnxruntime on x86, with the machine's FMA peak measured in the same run.

Not a unit test (pytest does not collect it). For each model: compile with the tuned pipeline
(tuning database; ``--tune-minutes``/``--trials`` search what it lacks), then time detc and
onnxruntime interleaved (ABBA, same input, same threads) and print

    model  onnxruntime ms  detc ms  ratio  detc GFLOP/s  of peak  onnxruntime GFLOP/s  of peak

GFLOP/s counts 2 × the model's convolution/matmul MACs; the peak is the best of a pure-FMA
kernel (kernels/fma_peak.py: every thread busy, the best of 8 and 16 lanes) before and after the
timings, on the same threads, printed beside the datasheet figure from lscpu (cores × GHz × FMA
per cycle × lanes × 2) and the clock the measured peak implies. On a machine shared with other
work the peak is low and noisy: its min/median/max over the calls is printed.

    nice python tests/bench/bench_tuning.py --tune-minutes 15 --threads 2
    python tests/bench/bench_tuning.py --models yolov5n --runs 40     # warm database: no search
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = {
    "demo": REPO / "compiler" / "assets" / "demo_detector.onnx",
    "yolov5n": REPO.parent / "shared" / "models" / "yolov5n.onnx",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,yolov5n", help="comma-separated: demo, yolov5n")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="interleaved runs of each")
    parser.add_argument("--tune-minutes", type=float, default=None)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--tuning-db", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-tuning")
    parser.add_argument("--json", action="store_true", help="one JSON line per model")
    args = parser.parse_args(argv)

    import onnx_ir as ir
    import tvm

    from detc.compiler.bench import bench_interleaved
    from detc.compiler.driver import compile_model, load
    from detc.compiler.ir.stats import graph_stats
    from detc.compiler.reference import ort_session, random_feeds, run_session
    from detc.compiler.verify.tensors import manifest_inputs
    from detc.kernels.fma_peak import measure_fma_peak, theoretical_peak
    from detc.targets.tuning.options import TuningOptions

    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        path = MODELS.get(name, Path(name))
        if not path.is_file():
            print(f"{name}: {path} is absent, skipped", file=sys.stderr)
            continue
        searching = args.tune_minutes is not None or args.trials is not None
        options = TuningOptions(
            tune=searching,
            minutes=args.tune_minutes,
            trials=args.trials,
            database=args.tuning_db,
            progress=False,
        )
        started = time.perf_counter()
        result = compile_model(
            path,
            target="x86",
            out_dir=args.out / name,
            num_threads=args.threads,
            progress=False,
            target_options={"tuning": options},
        )
        compile_s = time.perf_counter() - started
        manifest = result.manifest
        tvm_target = tvm.target.Target(manifest["target"]["tvm_target"])
        probes = [measure_fma_peak(tvm_target, args.threads)]

        compiled = load(args.out / name, num_threads=args.threads)
        session = ort_session(ir.load(path), threads=args.threads)
        feeds = random_feeds(manifest_inputs(manifest))
        timing = bench_interleaved(
            compiled.run,
            lambda f, session=session: run_session(session, f),
            feeds,
            a_name="detc",
            b_name="onnxruntime",
            threads=args.threads,
            warmup=3,
            runs=args.runs,
            progress=False,
        )
        probes.append(measure_fma_peak(tvm_target, args.threads))
        probe = max(probes, key=lambda p: p.gflops)
        peak = probe.gflops
        theory = theoretical_peak(args.threads)
        flops = 2.0 * graph_stats(ir.load(path)).macs
        detc_ms = timing.to_dict()["a"]["median_ms"]
        ort_ms = timing.to_dict()["b"]["median_ms"]
        row = {
            "model": name,
            "onnxruntime_ms": ort_ms,
            "detc_ms": detc_ms,
            "ratio": round(timing.ratio, 3),
            "detc_gflops": round(flops / detc_ms / 1e6, 1),
            "detc_of_peak": round(flops / detc_ms / 1e6 / peak, 3),
            "onnxruntime_gflops": round(flops / ort_ms / 1e6, 1),
            "onnxruntime_of_peak": round(flops / ort_ms / 1e6 / peak, 3),
            "fma_peak_gflops": round(peak, 1),
            "fma_peak_calls_min_median_max": [round(v, 1) for v in probe.spread()],
            "fma_peak_probes_gflops": [round(p.gflops, 1) for p in probes],  # before, after
            "fma_peak_kernel": {"lanes": probe.lanes, "chains": probe.chains},
            "fma_peak_threads": probe.threads,
            "fma_peak_one_thread_gflops": round(probe.single_thread_gflops, 1),
            "theoretical_gflops": round(theory.gflops, 1) if theory else None,
            "theoretical_basis": theory.describe() if theory else None,
            "fma_peak_implied_ghz": round(theory.implied_ghz(peak), 2) if theory else None,
            "gflop_per_inference": round(flops / 1e9, 3),
            "threads": args.threads,
            "runs": args.runs,
            "compile_s": round(compile_s, 1),
            "tuning": {
                k: manifest["tuning"].get(k)
                for k in ("tuned", "trials", "untuned_tasks", "tasks", "stopped_by")
            },
        }
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(
            f"{'model':<10} {'ORT ms':>8} {'detc ms':>8} {'ratio':>6} {'detc GF/s':>10} "
            f"{'of peak':>8} {'ORT GF/s':>9} {'of peak':>8} {'peak GF/s':>10}"
        )
        for r in rows:
            print(
                f"{r['model']:<10} {r['onnxruntime_ms']:>8.2f} {r['detc_ms']:>8.2f} "
                f"{r['ratio']:>6.3f} {r['detc_gflops']:>10.1f} {r['detc_of_peak']:>8.1%} "
                f"{r['onnxruntime_gflops']:>9.1f} {r['onnxruntime_of_peak']:>8.1%} "
                f"{r['fma_peak_gflops']:>10.1f}"
            )
            print(f"{'':<10} tuning: {r['tuning']}, compile {r['compile_s']} s")
            low, median, high = r["fma_peak_calls_min_median_max"]
            print(
                f"{'':<10} FMA peak {r['fma_peak_gflops']:.1f} GFLOP/s measured on "
                f"{r['fma_peak_threads']} threads ({r['fma_peak_kernel']['lanes']} lanes × "
                f"{r['fma_peak_kernel']['chains']} chains; calls {low} / {median} / {high} "
                f"min/median/max; 1 thread {r['fma_peak_one_thread_gflops']}), implies "
                f"{r['fma_peak_implied_ghz']} GHz"
            )
            print(f"{'':<10} {r['theoretical_basis']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
