"""detc.load(BUNDLE) and the bundle's python/detc_bundle.py: the model from Python through the
bundle's own C library, with numpy alone (no detc, TVM or onnx imported by the bundle's copy)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import detc
from detc.compiler.errors import BadInputError
from detc.targets import load_artifact
from detc.targets.bundle import detections_from_outputs
from detc.targets.bundle.loader import BundleError, BundleModel, read_ppm

from .conftest import STANDIN_CLASS_NAMES, standin_image, write_ppm

#: what a board without detc lacks: the bundle's copy must run without any of them
_ABSENT = ("detc", "tvm", "tvm_ffi", "onnx", "onnxruntime", "torch")


def test_detc_load_of_a_bundle_runs_its_c_library(
    standin_x86_artifact: Path, standin_x86_bundle: Path
) -> None:
    image = standin_image()
    expected = load_artifact(standin_x86_artifact)(image=image)
    with detc.load(standin_x86_bundle) as model:
        assert isinstance(model, BundleModel)
        assert [spec.name for spec in model.inputs] == ["image"]
        assert model.class_names == tuple(STANDIN_CLASS_NAMES)
        outputs = model(image=image)
        assert list(outputs) == list(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(outputs[name], value)
        found = [d.to_dict() for d in model.detect(image)]
    assert found == detections_from_outputs(expected)


def test_wrong_inputs_are_one_clear_error(standin_x86_bundle: Path) -> None:
    with BundleModel(standin_x86_bundle) as model:
        with pytest.raises(BundleError, match="no input named 'images'"):
            model(images=standin_image())
        with pytest.raises(BundleError, match="uint8"):
            model(image=standin_image().astype(np.float32))
        with pytest.raises(BundleError, match="an image is uint8"):
            model.detect(np.zeros((4, 4), np.uint8))
    with pytest.raises(BundleError, match="closed"):
        model(image=standin_image())


def test_a_tampered_bundle_does_not_load(standin_x86_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(standin_x86_bundle, bundle)
    with open(bundle / "model/model.so", "ab") as library:
        library.write(b"\0")
    with pytest.raises(BadInputError, match="SHA256SUMS"):
        detc.load(bundle)


def test_the_bundles_own_copy_runs_without_detc_or_tvm(
    standin_x86_bundle: Path, tmp_path: Path
) -> None:
    ppm = write_ppm(tmp_path / "spots.ppm", standin_image())
    np.testing.assert_array_equal(read_ppm(ppm), standin_image())
    script = standin_x86_bundle / "python" / "detc_bundle.py"
    # a finder that refuses every module a machine without detc lacks, then the script as main
    runner = textwrap.dedent(
        f"""
        import runpy, sys
        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {_ABSENT!r}:
                    raise ImportError(f"{{name}} is not on this board")
        sys.meta_path.insert(0, Absent())
        sys.argv = [{str(script)!r}, *sys.argv[1:]]
        runpy.run_path({str(script)!r}, run_name="__main__")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", runner, str(standin_x86_bundle), str(ppm), "--runs", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    with BundleModel(standin_x86_bundle) as model:
        expected = [d.to_dict() for d in model.detect(standin_image())]
    assert document["detections"] == expected
    assert document["latency_ms"]["runs"] == 2
