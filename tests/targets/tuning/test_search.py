"""Tuning: the NCHW[x]c template, the search on a tiny conv net, the database (reuse, export /
import, locking, interrupted writes), Ctrl-C, and the budget rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.errors import BadInputError
from detc.compiler.tolerances import FP32_EXACT
from detc.targets import build_artifact, load_artifact
from detc.targets.tuning.database import TuningDatabase, target_key
from detc.targets.tuning.loop import _most_promising
from detc.targets.tuning.options import TuningOptions
from detc.targets.tuning.tasks import Task, slowest_tasks_table

TARGET_JSON = {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2}


def tiny_conv_net(rng: np.random.Generator) -> onnx.ModelProto:
    """RGB stem conv (stride 2) + SiLU → 3×3 conv + SiLU → max pool → 1×1 head with 20
    outputs (not a whole channel block): every layout boundary the x86 passes handle."""
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(source: str, name: str, cin: int, cout: int, k: int, stride: int, act: bool) -> None:
        weight = (rng.standard_normal((cout, cin, k, k)) * 0.2).astype(np.float32)
        bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend(
            [
                numpy_helper.from_array(weight, f"{name}_w"),
                numpy_helper.from_array(bias, f"{name}_b"),
            ]
        )
        out = f"{name}_conv" if act else name
        nodes.append(
            helper.make_node(
                "Conv",
                [source, f"{name}_w", f"{name}_b"],
                [out],
                name=name,
                pads=[k // 2] * 4,
                strides=[stride, stride],
            )
        )
        if act:
            nodes.append(helper.make_node("Sigmoid", [out], [f"{name}_sig"], name=f"{name}_sig"))
            nodes.append(helper.make_node("Mul", [out, f"{name}_sig"], [name], name=f"{name}_mul"))

    conv("x", "stem", 3, 16, 3, 2, act=True)
    conv("stem", "body", 16, 32, 3, 1, act=True)
    nodes.append(
        helper.make_node(
            "MaxPool", ["body"], ["pool"], name="pool", kernel_shape=[3, 3], pads=[1] * 4
        )
    )
    conv("pool", "y", 32, 20, 1, 1, act=False)
    graph = helper.make_graph(
        nodes,
        "tiny_conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 20, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _build(model: onnx.ModelProto, out_dir: Path, options: TuningOptions) -> dict:
    return build_artifact(
        model, "x86", out_dir, manifest_fields={}, num_threads=2, progress=False, tuning=options
    )


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small tuning run shared by the tests below: 8 trials per kernel, so each conv gets
    its seeds (6: two tile shapes, four structural variants) and two candidates of the
    evolutionary search."""
    root = tmp_path_factory.mktemp("tuned")
    model = tiny_conv_net(np.random.default_rng(0))
    database = root / "db"
    manifest = _build(model, root / "artifact", TuningOptions(trials_per_task=8, database=database))
    return {"model": model, "root": root, "database": database, "manifest": manifest}


# ---- the search, applied -----------------------------------------------------------------------


def test_tuned_build_matches_onnxruntime(tuned: dict) -> None:
    compiled = load_artifact(tuned["root"] / "artifact", num_threads=2)
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
        np.testing.assert_allclose(
            compiled(x)["y"],
            _onnxruntime(tuned["model"], x),
            rtol=FP32_EXACT.rtol,
            atol=FP32_EXACT.atol,
        )


def test_manifest_records_the_tuning_state(tuned: dict) -> None:
    manifest = tuned["manifest"]
    tuning = manifest["tuning"]
    assert manifest["calling_convention"] == "inputs" and manifest["params"]["count"] == 0
    assert tuning["tuned"] is True and tuning["untuned_tasks"] == 0
    # Every function of the build came from the database: nothing kept TVM's default loops.
    assert tuning["functions_unscheduled"] == 0
    assert tuning["functions_from_database"] >= tuning["tasks"] >= 4
    assert 0 < tuning["trials"] <= 8 * tuning["tasks"]
    assert len(tuning["database_digest"]) == 64
    database = TuningDatabase(tuned["database"], manifest["target"]["tvm_target"])
    assert database.record_count() > 0 and tuning["target_key"] == database.target


def test_warm_database_runs_zero_trials_and_builds_the_same_kernels(tuned: dict) -> None:
    again = _build(
        tuned["model"],
        tuned["root"] / "again",
        TuningOptions(trials_per_task=8, database=tuned["database"]),
    )
    assert again["tuning"]["trials"] == 0 and again["tuning"]["tuned"] is True
    assert again["tuning"]["stopped_by"] == "database had every task"
    assert again["tuning"]["database_digest"] == tuned["manifest"]["tuning"]["database_digest"]
    assert again["library_sha256"] == tuned["manifest"]["library_sha256"]


def test_export_then_import_into_an_empty_database_runs_zero_trials(tuned: dict) -> None:
    source = TuningDatabase(tuned["database"], tuned["manifest"]["target"]["tvm_target"])
    exported = tuned["root"] / "exported.json"
    count = source.export_to(exported)
    assert count >= 4 and json.loads(exported.read_text())["format"] == "detc-tuning-db"
    fresh = TuningDatabase(tuned["root"] / "fresh", source.target_json)
    assert fresh.import_from(exported) == count
    assert fresh.import_from(exported) == 0  # nothing twice
    manifest = _build(
        tuned["model"],
        tuned["root"] / "imported",
        TuningOptions(trials_per_task=8, database=tuned["root"] / "fresh"),
    )
    assert manifest["tuning"]["trials"] == 0 and manifest["tuning"]["tuned"] is True


def test_database_of_another_target_does_not_serve_this_one(tuned: dict) -> None:
    other = dict(tuned["manifest"]["target"]["tvm_target"], **{"num-cores": 7})
    assert target_key(other) != tuned["manifest"]["tuning"]["target_key"]
    assert TuningDatabase(tuned["database"], other).record_count() == 0


def test_without_search_a_missing_kernel_is_counted_and_named(tuned: dict, tmp_path: Path) -> None:
    notices: list[str] = []
    manifest = build_artifact(
        tuned["model"],
        "x86",
        tmp_path / "cold",
        manifest_fields={},
        num_threads=2,
        progress=False,
        report=notices.append,
        tuning=TuningOptions(tune=False, database=tmp_path / "empty"),
    )
    tuning = manifest["tuning"]
    assert tuning["trials"] == 0 and tuning["tuned"] is False
    assert tuning["untuned_tasks"] == tuning["tasks"] and tuning["database_digest"] is None
    # The convolutions fall back to the template's default tiles, the rest to detc's default
    # schedule for data movement (kernels/injective.py) or, for plain copies and reductions,
    # to TVM's own lowering.
    assert tuning["functions_template_default"] == 3
    assert (
        tuning["functions_injective_default"] + tuning["functions_unscheduled"]
        == tuning["tasks"] - 3
    )
    assert any(n.startswith("partly tuned build:") for n in notices)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(
        load_artifact(tmp_path / "cold", num_threads=2)(x)["y"],
        _onnxruntime(tuned["model"], x),
        rtol=FP32_EXACT.rtol,
        atol=FP32_EXACT.atol,
    )


def test_ctrl_c_keeps_the_database_usable_and_leaves_no_artifact(tmp_path: Path) -> None:
    model = tiny_conv_net(np.random.default_rng(5))
    database = tmp_path / "db"

    def interrupt(_report: object) -> None:
        raise KeyboardInterrupt  # what Ctrl-C raises between two measured batches

    with pytest.raises(KeyboardInterrupt):
        _build(
            model,
            tmp_path / "out",
            TuningOptions(trials_per_task=4, database=database, on_batch=interrupt),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no artifact, no staging
    lines = (database / "records.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["run_s"] > 0 for line in lines)
    # The interrupted run's batch is in the database and serves the next build.
    resumed = _build(model, tmp_path / "out", TuningOptions(tune=False, database=database))
    assert resumed["tuning"]["untuned_tasks"] == resumed["tuning"]["tasks"] - 1


# ---- options, budget and report ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trials": 0}, "--trials must be at least 1"),
        ({"trials_per_task": 0}, "--trials-per-task must be at least 1"),
        ({"minutes": 0}, "--tune-minutes must be positive"),
        ({"rpc_tracker": "127.0.0.1:9190"}, "--rpc-tracker HOST:PORT and --rpc-key KEY together"),
        ({"layout": "nhwc"}, "unknown layout"),
    ],
)
def test_bad_options_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        TuningOptions(**changes)


def _task(name: str, best_s: float | None, weight: int, trials: int, flops: float = 1e9) -> Task:
    return Task(
        name=name,
        gvars=[],
        workload=None,
        workload_json=None,
        key=name,
        weight=weight,
        flops=flops,
        templated=True,
        best_s=best_s,
        trials=trials,
    )


def test_next_batch_goes_where_the_time_is_with_diminishing_returns() -> None:
    slow_once = _task("slow_once", 0.010, 1, 8)
    fast_often = _task("fast_often", 0.001, 6, 8)
    assert (
        _most_promising([slow_once, fast_often], {"slow_once": 64, "fast_often": 64}) is slow_once
    )
    # After many trials on the slow kernel, its expected gain falls below the other's.
    slow_once.trials = 8 + 5 * 32
    assert _most_promising([slow_once, fast_often], {"slow_once": 512, "fast_often": 64}) is (
        fast_often
    )
    # A kernel at its cap gets nothing more.
    assert _most_promising([slow_once], {"slow_once": slow_once.trials}) is None


def test_slowest_tasks_table_shows_share_and_gflops() -> None:
    table = slowest_tasks_table([_task("conv_a", 0.002, 2, 8, 4e9), _task("conv_b", 0.001, 1, 8)])
    assert table[0].split() == ["task", "calls", "share", "each", "GFLOP/s"]
    assert table[1].split()[:3] == ["conv_a", "2", "80.0%"] and table[1].endswith("2000.0")
    assert table[-1] == "sum of the tuned tasks: 5.00 ms per inference"


# ---- the database ------------------------------------------------------------------------------


def _fake_workload(index: int) -> list:
    return [str(1000 + index), f"workload-{index}"]


def _fake_record(tag: str) -> list:
    return [[["trace", tag]], [0.001], {"kind": "llvm"}, []]


# A separate interpreter per writer (not multiprocessing): a spawned child would have to import
# this test module by name, which pytest's importlib mode does not make importable.
_APPEND_MANY = """
import sys
from pathlib import Path
from detc.targets.tuning.database import TuningDatabase
directory, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
database = TuningDatabase(Path(directory), {target!r})
for i in range(count):
    workload = [str(1000 + i % 3), f"workload-{{i % 3}}"]
    record = [[["trace", f"{{worker}}-{{i}}"]], [0.001], {{"kind": "llvm"}}, []]
    database.add(workload, [(record, 0.001 * (i + 1))])
"""


def test_two_processes_appending_at_once_lose_nothing(tmp_path: Path) -> None:
    script = _APPEND_MANY.format(target=TARGET_JSON)
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(worker), "40"])
        for worker in range(2)
    ]
    for writer in writers:
        assert writer.wait(120) == 0
    database = TuningDatabase(tmp_path, TARGET_JSON)
    assert database.record_count() == 80
    assert database.workloads_with_records() == {"1000", "1001", "1002"}
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 80 and all(json.loads(line) for line in lines)


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    database = TuningDatabase(tmp_path, TARGET_JSON)
    database.add(_fake_workload(0), [(_fake_record("a"), 0.002), (_fake_record("b"), 0.001)])
    with (tmp_path / "records.jsonl").open("a") as stream:
        stream.write('{"workload": "1000", "target": "llvm-x86-64-v3')  # the write that died
    reread = TuningDatabase(tmp_path, TARGET_JSON)
    assert reread.record_count() == 2 and reread.best_seconds("1000") == 0.001


def test_compaction_keeps_the_best_records_atomically(tmp_path: Path) -> None:
    database = TuningDatabase(tmp_path, TARGET_JSON)
    records = [(_fake_record(str(i)), 0.001 * (10 - i)) for i in range(10)]
    database.add(_fake_workload(0), records)
    database.compact(keep=3)
    assert database.record_count() == 3 and database.best_seconds("1000") == pytest.approx(0.001)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_file_is_not_a_database_directory(tmp_path: Path) -> None:
    (tmp_path / "db").write_text("{}")
    with pytest.raises(BadInputError, match="not a directory"):
        TuningDatabase(tmp_path / "db", TARGET_JSON)
    with pytest.raises(BadInputError, match="not an exported detc tuning database"):
        TuningDatabase(tmp_path / "ok", TARGET_JSON).import_from(tmp_path / "db")


def test_default_database_lives_in_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detc.targets.tuning.database import default_database_dir

    monkeypatch.setenv("DETC_CACHE_DIR", str(tmp_path))
    assert default_database_dir() == tmp_path / "tuning"
    assert os.path.isdir(tmp_path)


def test_real_ctrl_c_on_the_cli_exits_130_and_leaves_a_usable_database(tmp_path: Path) -> None:
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) after the first
    measured batch: exit 130, no artifact, no staging, a database the next build uses."""
    import signal
    import subprocess
    import sys

    model_path = tmp_path / "net.onnx"
    onnx.save(tiny_conv_net(np.random.default_rng(9)), model_path)
    command = [
        sys.executable, "-m", "detc.compiler.cli", "compile", str(model_path), "--tune",
        "--trials", "5000", "--tuning-db", str(tmp_path / "db"), "-o", str(tmp_path / "out"),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        # A shell starts background jobs with SIGINT ignored; a terminal's foreground job has it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stderr is not None
    for line in process.stderr:
        if "trials in all" in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130, rest
    assert "interrupted" in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "net.onnx"]
    lines = (tmp_path / "db" / "records.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["run_s"] > 0 for line in lines)
    again = _build(
        tiny_conv_net(np.random.default_rng(9)),
        tmp_path / "out",
        TuningOptions(tune=False, database=tmp_path / "db"),
    )
    assert again["tuning"]["untuned_tasks"] < again["tuning"]["tasks"]


def test_tuning_for_a_cpu_this_machine_lacks_is_refused_before_searching(tmp_path: Path) -> None:
    from detc.targets.cpu import detect_host_cpu, missing_flags

    if not missing_flags("graniterapids", detect_host_cpu().flags):
        pytest.skip("this machine runs Granite Rapids code: nothing to refuse")
    with pytest.raises(BadInputError, match="needs CPU features this machine lacks"):
        build_artifact(
            tiny_conv_net(np.random.default_rng(0)),
            "x86:graniterapids",
            tmp_path / "out",
            manifest_fields={},
            progress=False,
            tuning=TuningOptions(trials=4, database=tmp_path / "db"),
        )
    assert not (tmp_path / "out").exists()


def test_every_fixed_variant_of_a_copy_kernel_is_storable_in_the_database() -> None:
    """MetaSchedule's databases drop a record whose trace is empty: the "as TVM lowered it"
    variant must still leave one, or a database whose best schedule for a kernel is that variant
    serves nothing for it (seen: 7 of the demo detector's 41 kernels fell back untuned)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from detc.kernels.injective import VARIANTS, schedule_injective

    data = te.placeholder((1, 2, 8, 8, 16), name="data")
    doubled = te.compute(data.shape, lambda *i: data(*i) * 2.0, name="doubled")
    mod = tvm.IRModule({"main": te.create_prim_func([data, doubled])})
    target = tvm.target.Target(TARGET_JSON)
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    for lanes, inline in VARIANTS:
        sch = schedule_injective(tvm.s_tir.Schedule(mod), lanes=lanes, inline=inline)
        memory = ms.database.MemoryDatabase(module_equality="structural")
        workload = memory.commit_workload(mod)
        record = ms.database.TuningRecord(sch.trace, workload, [1e-5], target, args_info)
        memory.commit_tuning_record(ms.database.TuningRecord.from_json(record.as_json(), workload))
        assert memory.query_schedule(mod, target, workload_name="main") is not None, (lanes, inline)
