"""The CLI as a user meets it: passes, explain, opt, plugins, pipelines from TOML, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from detc.compiler.reference import ort_session, run_session


def detc(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "detc.compiler.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def _conv_bn_identity_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv → BatchNormalization → Identity → Relu: every default pass has something to do."""
    c = 4
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"
        ),
        helper.make_node("Identity", ["b"], ["i"], name="ident"),
        helper.make_node("Relu", ["i"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_path(tmp_path: Path, rng: np.random.Generator) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(_conv_bn_identity_model(rng), path)
    return path


def test_passes_lists_every_builtin_with_kind() -> None:
    result = detc("passes")
    assert result.returncode == 0, result.stderr
    for name in (
        "fold-constants",
        "eliminate-dead-code",
        "fold-conv-bn",
        "fold-conv-mul-add",
        "remove-identity",
    ):
        line = next(line for line in result.stdout.splitlines() if line.startswith(name))
        assert " exact " in line


def test_passes_verbose_explains_each_option() -> None:
    result = detc("passes", "-v")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    option = next(i for i, line in enumerate(lines) if line.strip().startswith("mac_reduction:"))
    # the option's documentation follows it, indented under it
    assert lines[option + 1].startswith(" " * 36) and "MACs" in lines[option + 1]


def test_unknown_pass_exits_2_and_lists_known(model_path: Path, tmp_path: Path) -> None:
    result = detc(
        "opt", str(model_path), "-p", "fold-conv-bn,no-such-pass", "-o", str(tmp_path / "o.onnx")
    )
    assert result.returncode == 2
    assert "unknown pass 'no-such-pass'" in result.stderr
    assert "fold-conv-bn" in result.stderr and "eliminate-dead-code" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_compile_refuses_an_unknown_target_before_running_any_pass(
    model_path: Path, tmp_path: Path
) -> None:
    result = detc("compile", str(model_path), "--target", "sparc", "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "unknown target 'sparc'" in result.stderr
    assert "fold-conv-bn" not in result.stderr  # no pass ran (the pass table lists each one)
    assert not (tmp_path / "out").exists()


def test_opt_removes_batchnorm_and_matches_onnxruntime(
    model_path: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    out = tmp_path / "out.onnx"
    dump = tmp_path / "dump"
    result = detc(
        "opt",
        str(model_path),
        "-p",
        "remove-identity,fold-constants,fold-conv-bn,eliminate-dead-code",
        "-o",
        str(out),
        "--dump-ir",
        str(dump),
        "--verify-each",
    )
    assert result.returncode == 0, result.stderr
    optimized = onnx.load(out)
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "Relu"]
    assert "fold-conv-bn" in result.stdout  # the instruments table
    assert (dump / "00-input.onnx").is_file()
    assert any(p.name.endswith("fold-conv-bn.onnx") for p in dump.iterdir())
    x = {"x": rng.random((1, 3, 8, 8), dtype=np.float32)}
    expected = run_session(ort_session(onnx.load(model_path)), x)["y"]
    actual = run_session(ort_session(optimized), x)["y"]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_config_file_says_the_same_as_flags(model_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "detc.toml"
    config.write_text(
        textwrap.dedent(
            """
            [[passes]]
            name = "fold-conv-bn"
            [[passes]]
            name = "eliminate-dead-code"
            """
        )
    )
    via_config = detc(
        "opt", str(model_path), "--config", str(config), "-o", str(tmp_path / "a.onnx")
    )
    via_flag = detc(
        "opt",
        str(model_path),
        "-p",
        "fold-conv-bn,eliminate-dead-code",
        "-o",
        str(tmp_path / "b.onnx"),
    )
    assert via_config.returncode == 0 and via_flag.returncode == 0, via_config.stderr
    a, b = onnx.load(tmp_path / "a.onnx"), onnx.load(tmp_path / "b.onnx")
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    both = detc(
        "opt",
        str(model_path),
        "--config",
        str(config),
        "-p",
        "fold-conv-bn",
        "-o",
        str(tmp_path / "c.onnx"),
    )
    assert both.returncode == 2 and "not both" in both.stderr


def test_explain_says_why_a_pass_does_not_fire(tmp_path: Path, rng: np.random.Generator) -> None:
    model = _conv_bn_identity_model(rng)
    # a second consumer of the Conv output keeps fold-conv-bn from firing
    model.graph.node.append(helper.make_node("Relu", ["c"], ["side"], name="side_relu"))
    model.graph.output.append(
        helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 4, 8, 8])
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = detc("explain", "fold-conv-bn", str(path))
    assert result.returncode == 0, result.stderr
    assert "BatchNormalization 'bn'" in result.stdout
    assert "does not fire" in result.stdout
    assert "0 of 1 candidates fire" in result.stdout


PLUGIN_MODULE = '''
from __future__ import annotations

from dataclasses import dataclass

from detc.compiler import DetcPass, PassResult


@dataclass(frozen=True)
class RenameOptions:
    prefix: str = "plugin_"


class RenameNodesPass(DetcPass):
    """Prefix every node name (a plugin living outside detc)."""

    name = "rename-nodes"
    exact = True
    Options = RenameOptions

    def call(self, model):
        for node in model.graph:
            node.name = self.options.prefix + (node.name or node.op_type)
        return PassResult(model, modified=True)
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A separate distribution, built and installed (into its own folder) by pip in the test."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "detc_rename_plugin").mkdir(parents=True)
    (src / "detc_rename_plugin" / "__init__.py").write_text(PLUGIN_MODULE)
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "detc-rename-plugin"
            version = "0.1.0"
            [project.entry-points."detc.passes"]
            rename-nodes = "detc_rename_plugin:RenameNodesPass"
            [tool.setuptools]
            packages = ["detc_rename_plugin"]
            """
        )
    )
    site = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site


def test_plugin_pass_is_listed_and_runs_in_a_pipeline(
    plugin_site: Path, model_path: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(plugin_site)}
    listed = detc("passes", env=env)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("rename-nodes"))
    assert "exact" in line and "detc_rename_plugin" in line
    out = tmp_path / "renamed.onnx"
    ran = detc(
        "opt",
        str(model_path),
        "-p",
        "fold-conv-bn,rename-nodes{prefix=p_}",
        "-o",
        str(out),
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    assert all(n.name.startswith("p_") for n in onnx.load(out).graph.node)
    # without the plugin installed, the same pipeline is refused with the known passes listed
    refused = detc("opt", str(model_path), "-p", "rename-nodes", "-o", str(tmp_path / "x.onnx"))
    assert refused.returncode == 2 and "unknown pass 'rename-nodes'" in refused.stderr


def test_usage_error_exits_2() -> None:
    result = detc("compile")
    assert result.returncode == 2
    assert "Missing argument" in result.stderr


def test_calib_without_a_pass_that_reads_images_is_refused(
    model_path: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    result = detc("opt", str(model_path), "--calib", str(images), "-o", str(tmp_path / "o.onnx"))
    assert result.returncode == 2
    assert "no pass of the pipeline" in result.stderr and "prune, lowrank" in result.stderr
    assert not (tmp_path / "o.onnx").exists()
