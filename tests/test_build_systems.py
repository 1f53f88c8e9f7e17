"""detc called from Make and CMake as the README shows: builds once, is up to date after, rebuilds
when the model changes, and a failed check stops the build (the exit codes carry it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

#: the README's Makefile, with the detc command as a variable (tests run `python -m`)
MAKEFILE = """\
DETC ?= detc
MODEL := model.onnx
OUT := build/model

all: $(OUT).verified

$(OUT)/manifest.json: $(MODEL)
\t$(DETC) compile $(MODEL) --target x86 -o $(OUT)

$(OUT).verified: $(OUT)/manifest.json
\t$(DETC) verify $(OUT) --reference $(MODEL) && touch $@
"""

#: the README's CMakeLists.txt
CMAKELISTS = """\
cmake_minimum_required(VERSION 3.16)
project(detector_deploy NONE)
set(DETC detc CACHE STRING "the detc command")
set(MODEL ${CMAKE_SOURCE_DIR}/model.onnx)
set(OUT ${CMAKE_BINARY_DIR}/model)
add_custom_command(
  OUTPUT ${OUT}/manifest.json
  COMMAND ${DETC} compile ${MODEL} --target x86 -o ${OUT}
  DEPENDS ${MODEL} VERBATIM)
add_custom_command(
  OUTPUT ${OUT}.verified
  COMMAND ${DETC} verify ${OUT} --reference ${MODEL}
  COMMAND ${CMAKE_COMMAND} -E touch ${OUT}.verified
  DEPENDS ${OUT}/manifest.json VERBATIM)
add_custom_target(detector ALL DEPENDS ${OUT}.verified)
"""

DETC = f"{sys.executable} -m detc.compiler.cli"


def _model(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["scores"], name="act"),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _later(path: Path) -> None:
    """Move ``path``'s mtime past every build output (as an edit would)."""
    newest = max(p.stat().st_mtime for p in path.parent.rglob("*"))
    os.utime(path, (newest + 10, newest + 10))


def _run(*command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_builds_once_and_again_only_when_the_model_changes(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text(MAKEFILE)
    _model(tmp_path / "model.onnx", 0)
    built = _run("make", f"DETC={DETC}", cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "build/model/manifest.json").is_file()
    assert (tmp_path / "build/model.verified").is_file()
    assert _run("make", "-q", f"DETC={DETC}", cwd=tmp_path).returncode == 0  # up to date
    _later(tmp_path / "model.onnx")
    assert _run("make", "-q", f"DETC={DETC}", cwd=tmp_path).returncode == 1  # must rebuild

    # a check that fails stops the build: exit 3 (mismatch) becomes make's failure, and no
    # stamp claims the artifact was verified
    _model(tmp_path / "model.onnx", 1)  # the artifact was compiled from seed 0's weights
    (tmp_path / "build/model.verified").unlink()
    keep_artifact = ("-o", "build/model/manifest.json")  # verify only, do not recompile
    checked = _run("make", f"DETC={DETC}", "build/model.verified", *keep_artifact, cwd=tmp_path)
    assert checked.returncode != 0
    assert "verification mismatch" in checked.stderr or "beyond tolerance" in checked.stderr
    assert not (tmp_path / "build/model.verified").exists()


@pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None,
    reason="cmake or ninja is not installed",
)
def test_cmake_custom_command_builds_and_is_up_to_date(tmp_path: Path) -> None:
    source, binary = tmp_path / "src", tmp_path / "build"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(CMAKELISTS)
    _model(source / "model.onnx", 0)
    detc_list = DETC.replace(" ", ";")  # a CMake list: one argument per element
    configure = ["cmake", "-G", "Ninja", "-S", str(source), "-B", str(binary)]
    configured = _run(*configure, f"-DDETC={detc_list}", cwd=tmp_path)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = _run("cmake", "--build", str(binary), cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (binary / "model/manifest.json").is_file() and (binary / "model.verified").is_file()
    again = _run("ninja", "-C", str(binary), "-n", "-d", "explain", cwd=tmp_path)
    assert "no work to do" in again.stdout


def test_the_readme_shows_these_build_files() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert MAKEFILE in readme and CMAKELISTS in readme
