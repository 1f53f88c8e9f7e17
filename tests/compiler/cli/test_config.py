"""A build stated in a TOML file: keys are the commands' options, unknown keys are errors,
paths are relative to the file, flags win."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.cli.app import cli
from detc.compiler.cli.config import defaults_from_config
from detc.compiler.errors import BadInputError


def _detc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _write_model(path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Identity", ["c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with its model under models/ and a config that names it relatively."""
    (tmp_path / "models").mkdir()
    _write_model(tmp_path / "models" / "net.onnx")
    return tmp_path


def _config(project: Path, text: str) -> Path:
    path = project / "build.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_config_states_the_whole_command_relative_to_itself(project: Path) -> None:
    config = _config(
        project,
        """
        model = "models/net.onnx"
        output = "out/net.onnx"
        target = "x86"           # compile's: opt leaves it to compile
        pipeline = "remove-identity"
        """,
    )
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    result = _detc("opt", "--config", str(config), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    written = onnx.load(project / "out" / "net.onnx")
    assert [n.op_type for n in written.graph.node] == ["Conv"]


def test_flags_win_over_the_file(project: Path) -> None:
    config = _config(project, 'model = "models/net.onnx"\noutput = "out/a.onnx"\n')
    result = _detc("opt", "--config", str(config), "-o", str(project / "b.onnx"), cwd=project)
    assert result.returncode == 0, result.stderr
    assert (project / "b.onnx").is_file() and not (project / "out" / "a.onnx").exists()


def test_an_unknown_key_is_one_line_naming_it(project: Path) -> None:
    config = _config(project, 'model = "models/net.onnx"\noutptu = "x.onnx"\n')
    result = _detc("opt", "--config", str(config), cwd=project)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "unknown key 'outptu'" in lines[0] and "did you mean 'output'" in lines[0]
    assert not list(project.glob("*.onnx"))


def _command(name: str) -> click.Command:
    return cli.commands[name]


def test_keys_of_other_build_commands_are_accepted_and_left_to_them(tmp_path: Path) -> None:
    table = {"target": "arm", "tune-minutes": 5, "input_shape": "x:1x3x8x8", "model": "m.onnx"}
    siblings = [_command(n) for n in ("opt", "compile", "tune")]
    opt = defaults_from_config(tmp_path / "b.toml", table, _command("opt"), siblings)
    assert opt == {"input_shapes": ["x:1x3x8x8"], "model": str(tmp_path / "m.onnx")}
    compile_ = defaults_from_config(tmp_path / "b.toml", table, _command("compile"), siblings)
    assert compile_["target"] == "arm" and compile_["tune_minutes"] == 5
    assert compile_["model"] == str(tmp_path / "m.onnx")


def test_verify_reads_its_own_table_and_refuses_compile_keys_there(tmp_path: Path) -> None:
    verify = _command("verify")
    defaults = defaults_from_config(
        tmp_path / "b.toml", {"max_map_drop": 1.5, "data": "coco"}, verify, ()
    )
    assert defaults == {"max_map_drop": 1.5, "data": str(tmp_path / "coco")}
    with pytest.raises(BadInputError, match="unknown key 'target' in \\[verify\\]"):
        defaults_from_config(
            tmp_path / "b.toml", {"target": "x86"}, verify, (), where=" in [verify]"
        )


def test_a_table_where_a_value_belongs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="must be a value"):
        defaults_from_config(tmp_path / "b.toml", {"target": {"x": 1}}, _command("compile"), ())
