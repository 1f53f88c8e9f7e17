"""The driver as a Python user meets it: what it accepts, and what it says about the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import detc
from detc.compiler import BadInputError


def test_a_torch_module_is_refused_with_the_export_to_use(tmp_path: Path):
    torch = pytest.importorskip("torch")
    with pytest.raises(BadInputError, match=r"detc\.from_torch\(module, example_inputs\)"):
        detc.compile_model(torch.nn.Conv2d(3, 4, 3), target="x86", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_objects_name_what_is_accepted(tmp_path: Path):
    with pytest.raises(BadInputError, match=r"path to an \.onnx or \.pt2 file"):
        detc.compile_model(42, target="x86", out_dir=tmp_path / "out")


def test_torch_export_chatter_stays_out_of_a_pt2_import(tmp_path: Path):
    pytest.importorskip("torch")
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.silu(self.conv(x))

    archive = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(Net().eval(), (torch.randn(1, 3, 8, 8),)), archive)
    result = subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", "import", str(archive), "-o", "net.onnx"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower()
    assert (tmp_path / "net.onnx").is_file()
