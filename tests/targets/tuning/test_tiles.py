"""The int8 kernel's schedule knobs: every layout and tile computes the same bytes, and the
measured choice is recorded per workload and target and reused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from detc.kernels import int8_tiles as tiles_module  # noqa: E402
from detc.kernels.conv2d_int8 import (  # noqa: E402
    CHANNELS,
    PIXELS,
    QuantizedConv2d,
    build_conv2d_int8,
    default_tiles,
    int8_isa,
)
from detc.kernels.int8_tiles import candidate_tiles, workload_key  # noqa: E402
from detc.targets.runtime import configure_threads  # noqa: E402
from detc.targets.tuning.database import INT8_TILES_FILE as TILES_FILE  # noqa: E402
from detc.targets.tuning.database import TuningDatabase, import_records  # noqa: E402
from detc.targets.tuning.tiles import TileDatabase, tile_chooser  # noqa: E402

#: an AVX512-VNNI CPU: the kernels are compiled for it; run only where the host has VNNI
VNNI_TARGET = {"kind": "llvm", "mcpu": "icelake-server", "num-cores": 1}
#: where the tiles are measured (the x86 target's device)
CPU = tvm.cpu(0)


def _host_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags and "avx512bw" in flags


needs_vnni = pytest.mark.skipif(not _host_has_vnni(), reason="this CPU lacks AVX512-VNNI")


def _conv(
    rng: np.random.Generator,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    **changes: object,
) -> QuantizedConv2d:
    pad = kernel // 2
    conv = QuantizedConv2d(
        weight=rng.integers(-127, 128, (out_channels, in_channels, kernel, kernel)).astype(np.int8),
        weight_scale=rng.uniform(0.001, 0.01, out_channels).astype(np.float32),
        bias=rng.integers(-2000, 2000, out_channels).astype(np.int32),
        input_scale=0.02,
        input_zero_point=7,
        input_dtype="uint8",
        output_scale=0.05,
        output_zero_point=3,
        output_dtype="uint8",
        strides=(stride, stride),
        padding=(pad, pad, pad, pad),
        dilation=(1, 1),
    )
    return dataclasses.replace(conv, **changes)


def _run(data: np.ndarray, conv: QuantizedConv2d, tiles: dict | None) -> np.ndarray:
    target = tvm.target.Target(VNNI_TARGET)
    kernel = build_conv2d_int8(data.shape, conv, target, tiles)
    executable = tvm.compile(
        tvm.IRModule({"main": kernel.func.with_attr("global_symbol", "main")}), target=target
    )
    module = getattr(executable, "mod", executable)
    device = tvm.cpu()
    arrays = [tvm.runtime.tensor(data.reshape(kernel.func_data_shape or data.shape), device)]
    arrays += [tvm.runtime.tensor(c, device) for c in kernel.constants]
    out_shape = kernel.func_out_shape or kernel.out_shape
    arrays.append(tvm.runtime.tensor(np.zeros(out_shape, kernel.out_dtype), device))
    module["main"](*arrays)
    return arrays[-1].numpy().reshape(kernel.out_shape)


CASES: dict[str, tuple[tuple[int, int, int, int], dict[str, Any]]] = {
    # name: (data shape, conv arguments)
    "1x1 u8 silu (one row of H*W pixels)": ((1, 16, 8, 10), dict(kernel=1, activation="silu")),
    "1x1 float out, 20 channels": (
        (1, 8, 4, 8),
        dict(kernel=1, out=20, output_dtype="float32", output_scale=1.0, output_zero_point=0),
    ),
    "3x3 u8 relu, width 32": ((1, 12, 5, 32), dict(kernel=3, relu=True)),
    "3x3 int8 in/out sigmoid, width 32": (
        (1, 8, 3, 32),
        dict(kernel=3, input_dtype="int8", output_dtype="int8", activation="sigmoid"),
    ),
    "3x3 stride 2 (channels only)": ((1, 8, 9, 34), dict(kernel=3, stride=2)),
}


@needs_vnni
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_candidate_tile_computes_the_same_bytes(case: str) -> None:
    shape, arguments = CASES[case]
    arguments = dict(arguments)
    rng = np.random.default_rng(len(case))
    kernel = int(arguments.pop("kernel"))
    stride = int(arguments.pop("stride", 1))
    out_channels = int(arguments.pop("out", 32))
    conv = _conv(rng, shape[1], out_channels, kernel, stride, **arguments)
    data = rng.integers(0, 256, shape).astype(conv.input_dtype)
    reference = _run(data, conv, {"layout": CHANNELS})
    candidates = candidate_tiles(shape, conv, tvm.target.Target(VNNI_TARGET))
    layouts = {c["layout"] for c in candidates}
    assert layouts == ({CHANNELS} if stride == 2 else {CHANNELS, PIXELS})
    for tiles in candidates:
        out = _run(data, conv, tiles)
        assert out.dtype == reference.dtype
        # float32 outputs too: the same float operations in the same order per output
        np.testing.assert_array_equal(out, reference, err_msg=json.dumps(tiles))


def test_default_tiles_take_pixels_only_where_a_tile_divides_the_row() -> None:
    rng = np.random.default_rng(1)
    isa = int8_isa(tvm.target.Target(VNNI_TARGET))
    one_by_one = _conv(rng, 16, 16, 1)
    assert default_tiles((1, 16, 40, 40), one_by_one, isa) == {  # 1600 pixels in one row
        "layout": PIXELS,
        "oc_tile": 8,
        "ow_tile": 32,
    }
    three = _conv(rng, 16, 16, 3)
    assert default_tiles((1, 16, 80, 80), three, isa) == {
        "layout": PIXELS,
        "oc_tile": 3,
        "ow_tile": 80,
    }
    assert default_tiles((1, 16, 20, 20), three, isa) == {"layout": CHANNELS}
    strided = _conv(rng, 16, 64, 3, stride=2)
    assert default_tiles((1, 16, 80, 80), strided, isa) == {
        "layout": CHANNELS,
        "oc_tile": 4,
        "ow_tile": 5,
    }
    wide_8bit = _conv(rng, 16, 128, 1)
    assert default_tiles((1, 16, 40, 40), wide_8bit, isa)["layout"] == CHANNELS
    wide_float = dataclasses.replace(wide_8bit, output_dtype="float32", output_scale=1.0)
    assert default_tiles((1, 16, 40, 40), wide_float, isa)["layout"] == PIXELS


def test_workload_key_ignores_weight_values_but_not_shapes() -> None:
    rng = np.random.default_rng(2)
    first, second = _conv(rng, 8, 16, 3), _conv(rng, 8, 16, 3)
    assert workload_key((1, 8, 8, 8), first) == workload_key((1, 8, 8, 8), second)
    assert workload_key((1, 8, 8, 8), first) != workload_key((1, 8, 8, 16), first)
    silu = dataclasses.replace(first, activation="silu")
    assert workload_key((1, 8, 8, 8), first) != workload_key((1, 8, 8, 8), silu)


def test_tile_database_keeps_the_fastest_per_workload_and_target(tmp_path: Path) -> None:
    target = tvm.target.Target(VNNI_TARGET)
    other = tvm.target.Target({**VNNI_TARGET, "num-cores": 4})
    database = TileDatabase(tmp_path, target)
    slow = {"layout": CHANNELS, "oc_tile": 2, "ow_tile": 10}
    fast = {"layout": PIXELS, "oc_tile": 3, "ow_tile": 80}
    database.add("w1", slow, 2e-3, 5)
    database.add("w1", fast, 1e-3, 5)
    TileDatabase(tmp_path, other).add("w1", slow, 1e-4, 5)
    with open(tmp_path / TILES_FILE, "a") as handle:
        handle.write('{"workload": "w1", "tar')  # a line cut short by a crash
    reread = TileDatabase(tmp_path, target)
    assert reread.lookup("w1") == fast
    assert reread.lookup("w2") is None
    assert TileDatabase(tmp_path, other).lookup("w1") == slow


def test_tiles_measured_with_another_thread_count_are_not_used(tmp_path: Path) -> None:
    """A tile is the fastest for the thread count it was measured with; entries without one
    were measured on TVM's default pool (one thread here) for two-thread builds."""
    target = tvm.target.Target({**VNNI_TARGET, "num-cores": 2})
    tiles = {"layout": CHANNELS, "oc_tile": 2, "ow_tile": 10}
    entry = {"workload": "w1", "target": TileDatabase(tmp_path, target).target, "tiles": tiles}
    with open(tmp_path / TILES_FILE, "a") as handle:
        handle.write(json.dumps({**entry, "run_s": 1e-3}) + "\n")
        handle.write(json.dumps({**entry, "run_s": 1e-3, "threads": 1}) + "\n")
    assert TileDatabase(tmp_path, target).lookup("w1") is None
    TileDatabase(tmp_path, target).add("w1", tiles, 2e-3, 5)
    assert TileDatabase(tmp_path, target).lookup("w1") == tiles
    assert json.loads((tmp_path / TILES_FILE).read_text().splitlines()[-1])["threads"] == 2


def test_chooser_measures_with_the_targets_thread_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    def measure(
        _shape: object, _conv: object, _target: object, candidates: list, device: object
    ) -> list:
        seen.append(int(tvm.runtime.num_threads()))
        return [(candidates[0], 1e-3)]

    monkeypatch.setattr(tiles_module, "measure_tiles", measure)
    conv = _conv(np.random.default_rng(5), 8, 16, 1)
    target = tvm.target.Target({**VNNI_TARGET, "num-cores": 2})
    configure_threads(1)  # as TVM's default pool starts on a 2-core x86 machine
    tile_chooser(tmp_path, search=True, device=CPU)((1, 8, 4, 32), conv, target)
    assert seen == [2]


def test_exported_tuning_database_carries_the_int8_tiles(tmp_path: Path) -> None:
    """--export-db / --import-db (a file) and a database directory merge both take the tiles,
    and merging twice adds nothing."""
    target = tvm.target.Target(VNNI_TARGET)
    fast = {"layout": PIXELS, "oc_tile": 3, "ow_tile": 80}
    TileDatabase(tmp_path / "team", target).add("w1", fast, 1e-3, 5)
    exported = tmp_path / "team.json"
    TuningDatabase(tmp_path / "team", VNNI_TARGET).export_to(exported)
    for source in (exported, tmp_path / "team"):
        mine = tmp_path / f"mine-{source.suffix or 'dir'}"
        import_records(mine, source)
        import_records(mine, source)
        assert TileDatabase(mine, target).lookup("w1") == fast
        assert len((mine / TILES_FILE).read_text().splitlines()) == 1


@needs_vnni
def test_chooser_measures_once_records_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiles_module, "ROUNDS", 1)
    monkeypatch.setattr(tiles_module, "SAMPLE_SECONDS", 1e-4)
    rng = np.random.default_rng(3)
    conv = _conv(rng, 8, 16, 1)
    shape = (1, 8, 4, 32)
    target = tvm.target.Target(VNNI_TARGET)
    assert tile_chooser(tmp_path, search=False, device=CPU)(shape, conv, target) is None
    searches: list[float] = []
    chosen = tile_chooser(tmp_path, search=True, device=CPU, on_search=searches.append)(
        shape, conv, target
    )
    assert chosen in candidate_tiles(shape, conv, target)
    assert len(searches) == 1 and searches[0] > 0  # what --tune-minutes is charged
    lines = (tmp_path / TILES_FILE).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["tiles"] == chosen

    def no_measuring(*_: object, **__: object) -> None:
        raise AssertionError("a recorded workload was measured again")

    monkeypatch.setattr(tiles_module, "measure_tiles", no_measuring)
    assert (
        tile_chooser(tmp_path, search=True, device=CPU, on_search=searches.append)(
            shape, conv, target
        )
        == chosen
    )
    assert tile_chooser(tmp_path, search=False, device=CPU)(shape, conv, target) == chosen
    assert len(searches) == 1


def test_chooser_past_its_deadline_takes_the_default_and_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tune-minutes bounds the tile search: once its share is spent, a workload the database
    lacks takes the kernel's default and stays unrecorded for the next search."""
    import time

    def no_measuring(*_: object, **__: object) -> None:
        raise AssertionError("measured after the deadline")

    monkeypatch.setattr(tiles_module, "measure_tiles", no_measuring)
    conv = _conv(np.random.default_rng(4), 8, 16, 1)
    target = tvm.target.Target(VNNI_TARGET)
    choose = tile_chooser(tmp_path, search=True, device=CPU, deadline=time.monotonic() - 1.0)
    assert choose((1, 8, 4, 32), conv, target) is None
    assert not (tmp_path / TILES_FILE).exists()


@pytest.mark.parametrize("activation", [None, "silu", "sigmoid"])
@pytest.mark.parametrize("layout", [CHANNELS, PIXELS])
def test_epilogue_runs_at_the_full_vector_width(layout: str, activation: str | None) -> None:
    """Compiled, not run. The requantizing epilogue must come out of TVM as 16-lane vectors: a
    single non-vectorizable operation in it (``nearbyint`` was one) turns the whole loop into
    scalar code that LLVM re-vectorises at the target's preferred 8 lanes (yolov5n's int8
    build was 14 % slower with it)."""
    rng = np.random.default_rng(11)
    conv = _conv(rng, 16, 32, 1, activation=activation)
    target = tvm.target.Target(VNNI_TARGET)
    tiles = {"layout": layout, "oc_tile": 1 if layout == CHANNELS else 2, "ow_tile": 16}
    kernel = build_conv2d_int8((1, 16, 4, 16), conv, target, tiles)
    module = tvm.IRModule({"main": kernel.func.with_attr("global_symbol", "main")})
    executable = tvm.compile(module, target=target)
    llvm_ir = getattr(executable, "mod", executable).inspect_source("ll")
    assert "fmul <16 x float>" in llvm_ir
    assert "<8 x float>" not in llvm_ir
