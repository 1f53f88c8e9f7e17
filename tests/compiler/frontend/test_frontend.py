"""Front end: defensive ONNX loading, input shapes, opsets, and the torch paths."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler import BadInputError
from detc.compiler.frontend import load_model, load_onnx, parse_input_shapes


def _tiny_conv(
    rng: np.random.Generator, *, batch: int | str = 1, opset: int = 17
) -> onnx.ModelProto:
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv0", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, "h", "w"])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.metadata_props.add(key="names", value="{0: 'a', 1: 'b'}")
    return model


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_loads_checks_and_keeps_metadata(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_tiny_conv(rng), path)
    loaded = load_onnx(path)
    assert loaded.metadata["names"] == "{0: 'a', 1: 'b'}"
    assert len(loaded.sha256) == 64
    assert [n.op_type for n in loaded.model.graph] == ["Conv"]
    # shape inference ran: the output's shape is now known
    assert list(loaded.model.graph.outputs[0].shape) == [1, 4, 8, 8]


def test_input_shape_makes_dynamic_dims_static(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "dyn.onnx"
    onnx.save(_tiny_conv(rng, batch="N"), path)
    loaded = load_onnx(path, input_shapes=parse_input_shapes(["x:2x3x8x8"]))
    assert list(loaded.model.graph.inputs[0].shape) == [2, 3, 8, 8]
    assert list(loaded.model.graph.outputs[0].shape) == [2, 4, 8, 8]


@pytest.mark.parametrize("spec", ["x", "x:1x3x", "x:axb", ":1x2"])
def test_bad_input_shape_text(spec: str) -> None:
    with pytest.raises(BadInputError, match="NAME:DxDx"):
        parse_input_shapes([spec])


def test_input_shape_for_unknown_input(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_tiny_conv(rng, batch="N"), path)
    with pytest.raises(BadInputError, match="inputs are x"):
        load_onnx(path, input_shapes={"images": (1, 3, 8, 8)})


def test_old_opset_is_converted(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "old.onnx"
    onnx.save(_tiny_conv(rng, opset=9), path)
    loaded = load_onnx(path)
    assert loaded.model.opset_imports[""] == 17


def _bad_inputs(tmp_path: Path, rng: np.random.Generator) -> dict[str, tuple[Path, str]]:
    """Each bad file, and a word its error message must contain."""
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is not a model\n" * 10)

    good = _tiny_conv(rng).SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 2])

    escaping = _tiny_conv(rng)
    weight = escaping.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../etc/passwd")
    escaping_path = tmp_path / "escape.onnx"
    escaping_path.write_bytes(escaping.SerializeToString())

    pickled = tmp_path / "model.pt"
    pickled.write_bytes(pickle.dumps({"state_dict": [1, 2, 3]}, protocol=2))
    pickled_onnx_name = tmp_path / "sneaky.onnx"
    pickled_onnx_name.write_bytes(pickle.dumps({"weights": [1.0]}, protocol=4))
    return {
        "not onnx": (not_onnx, "not a valid ONNX model"),
        "truncated": (truncated, "ONNX"),
        "external data escaping": (escaping_path, "leaving the model's folder"),
        "pickled torch module": (pickled, "never unpickles"),
        "pickle named .onnx": (pickled_onnx_name, "pickle"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not onnx",
        "truncated",
        "external data escaping",
        "pickled torch module",
        "pickle named .onnx",
    ],
)
def test_bad_input_raises_one_line_naming_the_file(
    case: str, tmp_path: Path, rng: np.random.Generator
) -> None:
    path, word = _bad_inputs(tmp_path, rng)[case]
    with pytest.raises(BadInputError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    assert word in message
    assert "\n" not in message


def test_external_data_inside_the_folder_is_accepted(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    model = _tiny_conv(rng)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    loaded = load_onnx(path)
    assert loaded.model.graph.initializers["w"].const_value is not None


def test_external_data_symlink_leaving_the_folder_is_refused(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "model"
    outside.mkdir()
    inside.mkdir()
    onnx.save(
        _tiny_conv(rng),
        outside / "m.onnx",
        save_as_external_data=True,
        location="w.bin",
        size_threshold=0,
    )
    (inside / "w.bin").symlink_to(outside / "w.bin")
    (inside / "m.onnx").write_bytes((outside / "m.onnx").read_bytes())
    with pytest.raises(BadInputError, match="outside the model's folder"):
        load_onnx(inside / "m.onnx")


@pytest.mark.parametrize(
    "case",
    ["not onnx", "truncated", "external data escaping", "pickled torch module"],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(
    case: str, tmp_path: Path, rng: np.random.Generator
) -> None:
    path, _ = _bad_inputs(tmp_path, rng)[case]
    out = tmp_path / "out"
    for verb in (
        ["opt", str(path), "-o", str(out / "x.onnx")],
        ["import", str(path), "-o", str(out / "x.onnx")],
    ):
        before = sorted(p.name for p in tmp_path.iterdir())
        result = _run_cli(*verb, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_torch_module_front_end() -> None:
    pytest.importorskip("torch")
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x))

    from detc.compiler.frontend import from_torch

    loaded = from_torch(Tiny(), (torch.zeros(1, 3, 8, 8),))
    assert "Conv" in [n.op_type for n in loaded.model.graph]
    assert loaded.model.graph.inputs[0].name == "images"


def test_pt2_archive_front_end(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from detc.compiler.frontend import load_model as load

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Sigmoid()).eval()
    program = torch.export.export(model, (torch.zeros(1, 3, 4, 4),))
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))
    loaded = load(path)
    assert loaded.path == path
    assert {"Conv", "Sigmoid"} <= {n.op_type for n in loaded.model.graph}


def test_pt2_compiles_then_verifies_and_benches_without_a_reference(tmp_path: Path) -> None:
    """The workflow a PyTorch user runs: compile the .pt2, then verify and bench as for ONNX.
    onnxruntime cannot read the .pt2, so the artifact keeps the exported float model."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Sigmoid()).eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(1, 3, 16, 16),)), str(path))
    out = tmp_path / "art"
    compiled = _run_cli("compile", str(path), "--target", "x86", "-o", str(out), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["onnx"] == "reference.onnx"
    exported = onnx.load(out / "reference.onnx")
    assert [n.op_type for n in exported.graph.node] == ["Conv", "Sigmoid"]  # before any pass
    verified = _run_cli("verify", str(out), cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert "reference.onnx" in verified.stdout and "verify: ok" in verified.stdout + verified.stderr
    benched = _run_cli(
        "bench", str(out), "--vs", "onnxruntime", "--runs", "3", "--json", cwd=tmp_path
    )
    assert benched.returncode == 0, benched.stderr
