"""A .pt2 is untrusted input: no pickle runs, bounded unpacking, and dynamic dims can be fixed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from detc.compiler import BadInputError
from detc.compiler.frontend import inspect_pt2_archive, load_model

if TYPE_CHECKING:  # the annotations' torch; at run time, importorskip's
    import torch

torch = pytest.importorskip("torch")


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class _Payload:
    """Unpickling this touches a marker file: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def valid_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "conv.pt2"
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(
        _Conv().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes={"x": {0: batch}}
    )
    torch.export.save(program, path)
    return path


def _rewrite(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy a zip, replacing the members whose name ends with a key of ``replace``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            for suffix, replacement in replace.items():
                if info.filename.endswith(suffix):
                    data = replacement
            new.writestr(info, data)
    return target


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_pickle_payload_in_the_sample_inputs_never_runs(valid_pt2: Path, tmp_path: Path):
    marker = tmp_path / "payload-ran"
    payload = tmp_path / "payload.pt"
    torch.save((_Payload(marker),), payload)
    hostile = _rewrite(
        valid_pt2, tmp_path / "hostile.pt2", {"data/sample_inputs/model.pt": payload.read_bytes()}
    )
    with pytest.raises(BadInputError, match=r"hostile\.pt2"):
        load_model(hostile)
    assert not marker.exists()
    result = _cli("import", str(hostile), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out.onnx").exists()


def test_weights_stored_as_pickles_are_refused_before_torch_reads_them(
    valid_pt2: Path, tmp_path: Path
):
    with zipfile.ZipFile(valid_pt2) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(archive.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    hostile = _rewrite(
        valid_pt2,
        tmp_path / "pickled_weights.pt2",
        {"data/weights/model_weights_config.json": json.dumps(config).encode()},
    )
    with pytest.raises(BadInputError, match=rf"'{first}' is stored as a pickled object"):
        inspect_pt2_archive(hostile)


def test_a_zip_bomb_is_refused_by_its_compression_ratio(tmp_path: Path):
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/archive_format", "pt2")
        archive.writestr("m/data/weights/weight_0", bytes(64 * 1024**2))
    assert bomb.stat().st_size < 1024**2
    with pytest.raises(BadInputError, match="zip bomb"):
        load_model(bomb)


def test_unpacked_size_and_member_count_are_capped(valid_pt2: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DETC_MAX_MODEL_BYTES", "1000")
    with pytest.raises(BadInputError, match="over the 1,000-byte limit"):
        load_model(valid_pt2)
    monkeypatch.delenv("DETC_MAX_MODEL_BYTES")
    many = tmp_path / "many.pt2"
    with zipfile.ZipFile(many, "w") as archive:
        archive.writestr("m/archive_format", "pt2")
        for index in range(20_001):
            archive.writestr(f"m/data/constants/c{index}", b"")
    with pytest.raises(BadInputError, match="archive members"):
        load_model(many)


def test_not_a_zip_is_one_line(tmp_path: Path):
    fake = tmp_path / "fake.pt2"
    fake.write_bytes(b"not a zip at all")
    with pytest.raises(BadInputError, match="not a zip file"):
        load_model(fake)


def test_a_dynamic_batch_is_fixed_with_input_shape(valid_pt2: Path):
    loaded = load_model(valid_pt2, input_shapes={"x": (1, 3, 8, 8)})
    assert list(loaded.model.graph.inputs[0].shape) == [1, 3, 8, 8]
    assert list(loaded.model.graph.outputs[0].shape) == [1, 4, 8, 8]
