"""A mutation fuzzer over valid models: ``detc compile`` then ``detc verify`` on each mutant.

Mutants come from a few valid seed models by flipping bytes of the file, dropping or reordering
nodes, rewiring an input, and perturbing attributes, dimensions and dtypes, from a fixed seed.
They run in a worker process that calls the CLI's ``main`` in-process (no interpreter start per
case), one mutant at a time; the parent (the test) only reads the worker's reports, so it never
crashes whatever the mutants do. A worker that dies (a native crash in TVM or onnxruntime) or
hangs is counted, its mutant saved as a reproducer with the crash log, and a fresh worker started.
Every exit 4 (an internal error) is saved as a reproducer too, with the component the error line
names.

    python -m tests.security.fuzz --seconds 600 --out fuzz-findings   # a longer run by hand
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.security.hostile import conv_model

REPO_ROOT = Path(__file__).resolve().parents[2]
#: the seconds one mutant may take (compile and verify of a model this small: a few seconds)
CASE_TIMEOUT_S = 120.0


# ---- seeds and mutations -----------------------------------------------------------------


def head_model() -> onnx.ModelProto:
    """A small detection-head-like graph: Conv, Sigmoid, MaxPool, Resize, Concat, Reshape,
    Transpose, and a 0-d scale."""
    rng = np.random.default_rng(1)
    inits: dict[str, np.ndarray] = {
        "w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
        "scales": np.array([1, 1, 2, 2], np.float32),
        "shape": np.array([1, 16, 256], np.int64),
        "half": np.array(0.5, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["s", "half"], ["m"], name="scale"),
        helper.make_node("MaxPool", ["m"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["p", "", "scales"], ["r"], name="up", mode="nearest"),
        helper.make_node("Concat", ["c", "r"], ["cat"], name="cat", axis=1),
        helper.make_node("Reshape", ["cat", "shape"], ["flat"], name="flat"),
        helper.make_node("Transpose", ["flat"], ["y"], name="boxes", perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256, 16])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


SEEDS: dict[str, Callable[[], onnx.ModelProto]] = {"conv": conv_model, "head": head_model}

_DTYPES = [
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.INT64,
    TensorProto.INT32,
    TensorProto.UINT8,
    TensorProto.BOOL,
    TensorProto.STRING,
    0,
]
_SIZES = [0, 1, 2, 3, 7, -1, 2**31, 2**40, 2**62]


def _flip_bytes(model: onnx.ModelProto, rng: random.Random) -> bytes:
    data = bytearray(model.SerializeToString())
    for _ in range(rng.randint(1, 6)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _drop_node(model: onnx.ModelProto, rng: random.Random) -> bytes:
    del model.graph.node[rng.randrange(len(model.graph.node))]
    return model.SerializeToString()


def _reorder_nodes(model: onnx.ModelProto, rng: random.Random) -> bytes:
    nodes = list(model.graph.node)
    rng.shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


def _rewire(model: onnx.ModelProto, rng: random.Random) -> bytes:
    names = [v.name for v in model.graph.input] + [t.name for t in model.graph.initializer]
    names += [o for n in model.graph.node for o in n.output]
    node = rng.choice(list(model.graph.node))
    if node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(names)
    return model.SerializeToString()


def _perturb_attribute(model: onnx.ModelProto, rng: random.Random) -> bytes:
    candidates = [a for n in model.graph.node for a in n.attribute]
    if not candidates:
        return _drop_node(model, rng)
    attribute = rng.choice(candidates)
    if attribute.ints:
        index = rng.randrange(len(attribute.ints))
        attribute.ints[index] = rng.choice([-2, -1, 0, 1, 3, 99, 2**40])
        if rng.random() < 0.3:
            attribute.ints.append(rng.choice([0, 1, 5]))
    elif attribute.type == onnx.AttributeProto.INT:
        attribute.i = rng.choice([-3, -1, 0, 2, 5, 2**33])
    elif attribute.type == onnx.AttributeProto.FLOAT:
        attribute.f = rng.choice([-1.0, 0.0, float("nan"), float("inf"), 1e30])
    elif attribute.type == onnx.AttributeProto.STRING:
        attribute.s = rng.choice([b"", b"cubic", b"\xff", b"linear" * 50])
    return model.SerializeToString()


def _perturb_dims(model: onnx.ModelProto, rng: random.Random) -> bytes:
    values = list(model.graph.input) + list(model.graph.output)
    if rng.random() < 0.5 and model.graph.initializer:
        tensor = rng.choice(list(model.graph.initializer))
        if tensor.dims:
            tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice(_SIZES)
        return model.SerializeToString()
    dims = rng.choice(values).type.tensor_type.shape.dim
    if dims:
        dim = dims[rng.randrange(len(dims))]
        if rng.random() < 0.2:
            dim.dim_param = "N"
        else:
            dim.dim_value = rng.choice(_SIZES)
    return model.SerializeToString()


def _perturb_dtype(model: onnx.ModelProto, rng: random.Random) -> bytes:
    if rng.random() < 0.5 and model.graph.initializer:
        rng.choice(list(model.graph.initializer)).data_type = rng.choice(_DTYPES)
    else:
        values = list(model.graph.input) + list(model.graph.output)
        rng.choice(values).type.tensor_type.elem_type = rng.choice(_DTYPES)
    return model.SerializeToString()


MUTATIONS: dict[str, Callable[[onnx.ModelProto, random.Random], bytes]] = {
    "flip-bytes": _flip_bytes,
    "drop-node": _drop_node,
    "reorder-nodes": _reorder_nodes,
    "rewire": _rewire,
    "attribute": _perturb_attribute,
    "dims": _perturb_dims,
    "dtype": _perturb_dtype,
}


def mutants(seed: int) -> Iterator[tuple[str, bytes]]:
    """An endless, reproducible stream of (description, model bytes)."""
    rng = random.Random(seed)
    seeds = {name: build() for name, build in SEEDS.items()}
    index = 0
    while True:
        seed_name = rng.choice(sorted(seeds))
        operators = rng.sample(sorted(MUTATIONS), rng.choice([1, 1, 2]))
        model = onnx.ModelProto.FromString(seeds[seed_name].SerializeToString())
        data = b""
        for operator in operators:
            data = MUTATIONS[operator](model, rng)
            try:
                model = onnx.ModelProto.FromString(data)
            except Exception:  # a flipped byte the parser refuses: the bytes are the mutant
                break
        yield f"{index:05d}-{seed_name}-{'+'.join(operators)}", data
        index += 1


# ---- the worker -----------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """``detc ARGV`` in this process: (exit code, everything written to stderr, native
    writes to fd 2 included)."""
    from detc.compiler.cli.app import main

    captured = io.StringIO()
    saved_stdout, saved_stderr = sys.stdout, sys.stderr
    with tempfile.TemporaryFile() as native:
        saved_fd = os.dup(2)
        os.dup2(native.fileno(), 2)
        sys.stdout, sys.stderr = io.StringIO(), captured
        try:
            main(argv)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        finally:
            sys.stdout, sys.stderr = saved_stdout, saved_stderr
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        native.seek(0)
        text = native.read().decode(errors="replace")
    return code, captured.getvalue() + text


def worker() -> None:
    """Read one JSON request per line ({"model", "out", "crash_log"}), compile and verify,
    write one JSON report per line on the original stdout."""
    reports = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    for line in sys.stdin:
        request = json.loads(line)
        with open(request["crash_log"], "w") as crash_log:
            faulthandler.enable(crash_log)
            compiled = _run_cli(["compile", "--quiet", request["model"], "-o", request["out"]])
            verified: tuple[int | None, str] = (None, "")
            if compiled[0] == 0:
                verified = _run_cli(["verify", request["out"]])
            faulthandler.disable()
        reports.write(json.dumps({"compile": compiled, "verify": verified}) + "\n")


# ---- the parent ---------------------------------------------------------------------------

_COMPONENT = re.compile(r"internal error in ([\w-]+)")
_CRASH_COMPONENT = re.compile(r"(?:site|dist)-packages/(\w+)/")


@dataclass
class Finding:
    name: str
    what: str  # "exit 4", "crash", "hang", "bad report"
    component: str
    line: str
    reproducer: Path


@dataclass
class FuzzReport:
    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    #: exits 2 without exactly one error line, or with a traceback (every refusal must be one)
    untidy: list[str] = field(default_factory=list)
    #: exits 2 whose error line came with other lines (notices, native libraries' logging)
    chatty: list[str] = field(default_factory=list)

    @property
    def cases_per_second(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        found = ", ".join(f"{f.name}: {f.what} in {f.component}" for f in self.findings)
        return (
            f"{self.cases} mutants in {self.seconds:.0f} s ({self.cases_per_second:.1f}/s); "
            f"outcomes {dict(sorted(self.outcomes.items()))}; refusals with other lines too: "
            f"{len(self.chatty)}; findings: {found or 'none'}"
        )


class _Worker:
    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tests.security.fuzz import worker; worker()"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def ask(self, request: dict[str, str], timeout_s: float) -> dict | None:
        """The report, or None when the worker died or hung (then it is gone)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return None
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                self.stop()
                return None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            return None
        return json.loads(line)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _tidy(text: str) -> bool:
    """One ``detc: error:`` line and no traceback. Other lines (notices, native libraries' log
    lines such as TVM's "[17:17:27] block_builder.cc:67: Warning: ...") are counted apart."""
    errors = [line for line in text.splitlines() if line.startswith("detc: error:")]
    return "Traceback" not in text and len(errors) == 1


def _chatty(text: str) -> bool:
    return len([line for line in text.splitlines() if line.strip()]) > 1


def fuzz(
    seconds: float, findings_dir: Path, *, seed: int = 0, max_cases: int | None = None
) -> FuzzReport:
    """Run mutants for ``seconds``; reproducers of every finding go to ``findings_dir``."""
    findings_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="detc-fuzz-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETC_")}
    env.update(DETC_CACHE_DIR=str(work / "cache"), TVM_NUM_THREADS="1")
    report = FuzzReport()
    started = time.monotonic()
    current: _Worker | None = None
    try:
        for name, data in mutants(seed):
            if time.monotonic() - started > seconds or (max_cases and report.cases >= max_cases):
                break
            model, out, crash_log = work / "mutant.onnx", work / "out", work / "crash.log"
            model.write_bytes(data)
            if current is None:
                current = _Worker(env)
            answer = current.ask(
                {"model": str(model), "out": str(out), "crash_log": str(crash_log)},
                CASE_TIMEOUT_S,
            )
            report.cases += 1
            if answer is None:
                hung = current.process.returncode in (-9, None)
                log = crash_log.read_text(errors="replace") if crash_log.exists() else ""
                component = next(iter(_CRASH_COMPONENT.findall(log)[::-1]), "unknown")
                what = "hang" if hung else f"crash ({current.process.returncode})"
                report.outcomes[what.split()[0]] += 1
                report.findings.append(
                    _save(findings_dir, name, data, what, component, log[-4000:])
                )
                current = None
                continue
            for step in ("compile", "verify"):
                code, text = answer[step]
                if code is None:
                    continue
                report.outcomes[f"{step} {code}"] += 1
                if code == 4:
                    found = _COMPONENT.search(text)
                    report.findings.append(
                        _save(
                            findings_dir,
                            name,
                            data,
                            f"{step} exit 4",
                            found.group(1) if found else "detc",
                            text,
                        )
                    )
                elif code == 2 and not _tidy(text):
                    report.untidy.append(f"{name} ({step}): {text[-500:]}")
                elif code == 2 and _chatty(text):
                    report.chatty.append(f"{name} ({step}): {text[-500:]}")
                if code != 0:
                    break
    finally:
        if current is not None:
            current.stop()
        report.seconds = time.monotonic() - started
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return report


def _save(folder: Path, name: str, data: bytes, what: str, component: str, log: str) -> Finding:
    """The mutant and what it did, as a reproducer: ``detc compile <name>.onnx -o out``."""
    model = folder / f"{name}.onnx"
    model.write_bytes(data)
    (folder / f"{name}.txt").write_text(
        f"{what} in {component}\nreproduce: detc compile {model.name} -o out && detc verify out\n"
        f"\n{log}"
    )
    line = next((x for x in log.splitlines() if "internal error" in x), log.strip()[-200:])
    return Finding(name, what, component, line, model)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    options = parser.parse_args()
    result = fuzz(options.seconds, options.out, seed=options.seed)
    print(result.summary())
    for line in result.untidy:
        print("untidy:", line)
    for line in result.chatty:
        print("chatty:", line)


if __name__ == "__main__":
    _main()
