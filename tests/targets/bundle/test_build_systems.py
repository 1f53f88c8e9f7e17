"""Build systems: the depfile (Make reruns a compile when a calibration image changes, and only
then) and the CMake package (detc_add_model compiles, verifies and packages)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from detc.compiler.depfile import compile_dependencies, depfile_text, escape_make_path
from detc.targets.bundle import Bundle, cmake_dir

from .conftest import tiny_detector

DETC = [sys.executable, "-m", "detc.compiler.cli"]


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def _later(path: Path) -> None:
    """Move ``path``'s mtime past every file beside it (as an edit would)."""
    newest = max(p.stat().st_mtime for p in path.parent.parent.rglob("*"))
    os.utime(path, (newest + 10, newest + 10))


def test_dependencies_name_the_model_its_data_the_images_and_the_spec(tmp_path: Path) -> None:
    model = tiny_detector()
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.data", size_threshold=0)  # fmt: skip
    calib = tmp_path / "calib images"
    calib.mkdir()
    for name in ("a.jpg", "b.png", ".thumbs.db"):
        (calib / name).write_bytes(b"x")
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    found = compile_dependencies(
        tmp_path / "model.onnx", pipeline=f'quantize{{calib="{calib}"}}', spec=spec
    )
    assert found == [
        tmp_path / "model.onnx",
        tmp_path / "model.data",
        spec,
        calib,
        calib / "a.jpg",
        calib / "b.png",
    ]
    assert escape_make_path("calib images/$x#1") == "calib\\ images/$$x\\#1"
    assert depfile_text("out/manifest.json", ["m.onnx", "c d"]) == (
        "out/manifest.json: \\\n  m.onnx \\\n  c\\ d\n"
    )


#: a Makefile whose "compile" writes the artifact and its depfile as detc compile --depfile does
MAKEFILE = """\
OUT := build/model
all: $(OUT)/manifest.json
$(OUT)/manifest.json: model.onnx
\tmkdir -p $(OUT) && echo built >> build.log && touch $@
\t$(PYTHON) -c "$$WRITE_DEPFILE" $@ build/model.d
-include build/model.d
"""

WRITE_DEPFILE = """
import sys
from pathlib import Path
from detc.compiler.depfile import compile_dependencies, write_depfile
deps = compile_dependencies(Path('model.onnx'), pipeline='quantize{calib=calib}')
write_depfile(Path(sys.argv[2]), sys.argv[1], deps)
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_rebuilds_when_a_calibration_image_changes_and_not_otherwise(
    tmp_path: Path,
) -> None:
    (tmp_path / "Makefile").write_text(MAKEFILE)
    onnx.save(tiny_detector(), tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "calib" / name).write_bytes(b"image")
    (tmp_path / "notes.txt").write_text("unrelated")
    env = {**os.environ, "WRITE_DEPFILE": WRITE_DEPFILE}

    def make(*args: str) -> int:
        done = subprocess.run(
            ["make", f"PYTHON={sys.executable}", *args], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stdout + done.stderr
        return done.returncode

    def age_everything() -> None:
        # edits below then happen "now", after every build output, whatever the clock's grain
        for path in [tmp_path, *tmp_path.rglob("*")]:
            os.utime(path, (path.stat().st_mtime - 100,) * 2)

    assert make() == 0
    assert "calib/a.jpg" in (tmp_path / "build/model.d").read_text()
    assert make("-q") == 0  # up to date
    age_everything()
    os.utime(tmp_path / "notes.txt")
    assert make("-q") == 0  # a file the compile does not read changes nothing
    os.utime(tmp_path / "calib" / "b.jpg")
    assert make("-q") == 1  # a calibration image changed: rebuild
    assert make() == 0 and make("-q") == 0
    age_everything()
    (tmp_path / "calib" / "c.jpg").write_bytes(b"new image")
    assert make("-q") == 1  # an image added: the folder is a prerequisite too
    assert (tmp_path / "build.log").read_text().count("built") == 2


CMAKELISTS = """\
cmake_minimum_required(VERSION 3.20)
project(detector_deploy NONE)
find_package(detc REQUIRED)
detc_add_model(detector MODEL model.onnx TARGET x86)
"""


@pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None,
    reason="cmake or ninja is not installed",
)
def test_detc_add_model_compiles_verifies_and_packages(tmp_path: Path) -> None:
    source, binary = tmp_path / "src", tmp_path / "build"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(CMAKELISTS)
    onnx.save(tiny_detector(), source / "model.onnx")
    printed = _run(*DETC, "--cmake-dir", cwd=tmp_path)
    assert printed.returncode == 0 and Path(printed.stdout.strip()) == cmake_dir()
    configure: list[str | Path] = ["cmake", "-G", "Ninja", "-S", source, "-B", binary]
    configured = _run(
        *configure, f"-Ddetc_DIR={cmake_dir()}", f"-DDETC_EXECUTABLE={';'.join(DETC)}",
        cwd=tmp_path,
    )  # fmt: skip
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = _run("cmake", "--build", binary, cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (binary / "detector.verified").is_file()
    assert Bundle.open(binary / "detector-bundle").architecture == "x86_64"
    assert "model.onnx" in (binary / "detector.d").read_text()
    again = _run("ninja", "-C", binary, "-n", "-d", "explain", cwd=tmp_path)
    assert "no work to do" in again.stdout, again.stdout + again.stderr

    # the weights change: compile, verify and package run again
    changed = tiny_detector(seed=1)
    assert numpy_helper.to_array(changed.graph.initializer[0]).any()
    onnx.save(changed, source / "model.onnx")
    _later(source / "model.onnx")
    rebuilt = _run("ninja", "-C", binary, "-v", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    for verb in ("compile", "verify", "package"):
        assert f"detc.compiler.cli {verb}" in rebuilt.stdout
