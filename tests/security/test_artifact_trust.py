"""What detc trusts of an artifact folder: only what it built. Every file the manifest names lies
inside the folder; the library's sha256 is required and checked, on a private copy, before the
runtime, the emulator or an RPC board loads it; the float reference is the copy the artifact keeps,
checked against its sha256, never the source path the manifest records."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from detc.compiler.errors import BadInputError
from detc.compiler.verify.artifact import default_reference, verify_artifact
from detc.targets import Artifact, load_artifact
from detc.targets.artifact import Manifest
from detc.targets.remote import rpc
from tests.security.hostile import build_evil_library, conv_model, edit_manifest, run_detc


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact compiled by the CLI from conv.onnx, which is then deleted."""
    root = tmp_path_factory.mktemp("trust")
    onnx.save(conv_model(), root / "conv.onnx")
    run = run_detc(["compile", "conv.onnx", "-o", "artifact", "--quiet"], root)
    assert run.returncode == 0, run.stderr
    (root / "conv.onnx").unlink()
    return root / "artifact"


@pytest.fixture
def artifact(compiled: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "artifact"
    shutil.copytree(compiled, copy)
    return copy


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A library whose constructor creates a marker file, and the marker."""
    root = tmp_path_factory.mktemp("evil")
    marker = root / "constructor-ran"
    library = build_evil_library(root, marker)
    if library is None:
        pytest.skip("no C compiler for the payload library")
    return library, marker


def test_the_library_digest_is_required(compiled: Path) -> None:
    document = json.loads((compiled / "manifest.json").read_text())
    del document["library_sha256"]
    with pytest.raises(BadInputError, match="lacks 'library_sha256'"):
        Manifest.parse(document, compiled / "manifest.json")
    document["library_sha256"] = "not a digest"
    with pytest.raises(BadInputError, match="sha256 for the library"):
        Manifest.parse(document, compiled / "manifest.json")


def test_a_replaced_library_without_digest_never_runs(
    artifact: Path, evil: tuple[Path, Path]
) -> None:
    library, marker = evil
    shutil.copy(library, artifact / "model.so")
    edit_manifest(artifact, library_sha256=None)
    with pytest.raises(BadInputError, match="sha256"):
        load_artifact(artifact, num_threads=1)
    assert not marker.exists()


def test_a_library_swapped_after_the_check_is_not_the_one_loaded(
    artifact: Path, evil: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime loads a private copy whose digest it checked: a library replaced between the
    check and the load (or after) never runs."""
    library, marker = evil
    real_copy = Artifact.library_copy

    def swap_then_copy(self: Artifact):
        shutil.copy(library, self.library_path)  # the attacker's moment
        return real_copy(self)

    monkeypatch.setattr(Artifact, "library_copy", swap_then_copy)
    with pytest.raises(BadInputError, match="does not match its manifest"):
        load_artifact(artifact, num_threads=1)
    assert not marker.exists()


def test_the_emulator_and_rpc_load_only_a_checked_copy(
    artifact: Path, evil: tuple[Path, Path]
) -> None:
    library, marker = evil
    shutil.copy(library, artifact / "model.so")
    opened = Artifact.open(artifact)
    uploads: list[str] = []
    remote = SimpleNamespace(upload=lambda path, name: uploads.append(path))
    fake_model = SimpleNamespace(_remote=lambda: remote, runner=SimpleNamespace(artifact=opened))
    with pytest.raises(BadInputError, match="does not match its manifest"):
        rpc._RemoteModel._load_library(fake_model)
    assert uploads == [] and not marker.exists()
    with pytest.raises(BadInputError, match="does not match its manifest"), opened.library_copy():
        pass


def test_every_named_file_stays_inside_the_folder(artifact: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    onnx.save(conv_model(), outside)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    (artifact / "inner").symlink_to(outside)
    for source in (
        {"onnx": str(outside), "onnx_sha256": digest},
        {"onnx": "../outside.onnx", "onnx_sha256": digest},
        {"onnx": "inner", "onnx_sha256": digest},  # a symlink leading out
    ):
        edit_manifest(artifact, source=source)
        with pytest.raises(BadInputError, match="not a file inside"):
            Artifact.open(artifact)


def test_the_default_reference_is_the_kept_model_never_the_source_path(
    compiled: Path, artifact: Path, tmp_path: Path
) -> None:
    # the source file is gone, and verify still has its reference: the copy inside
    manifest = json.loads((compiled / "manifest.json").read_text())
    assert not Path(manifest["source"]["path"]).exists()
    kept = compiled / "reference.onnx"
    assert manifest["source"]["onnx_sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()
    assert default_reference(manifest, compiled) == kept
    assert verify_artifact(compiled, threads=1).ok
    # an artifact keeping none does not fall back to a model at source.path
    elsewhere = tmp_path / "elsewhere.onnx"
    onnx.save(conv_model(seed=3), elsewhere)
    edit_manifest(artifact, source={"path": str(elsewhere), "sha256": "0" * 64, "onnx": None})
    (artifact / "reference.onnx").unlink()
    with pytest.raises(BadInputError, match="keeps no reference"):
        verify_artifact(artifact, threads=1)


def test_a_tampered_reference_is_refused(artifact: Path) -> None:
    onnx.save(conv_model(seed=5), artifact / "reference.onnx")
    with pytest.raises(BadInputError, match=r"reference.onnx does not match its manifest"):
        verify_artifact(artifact, threads=1)


def test_params_are_checked_before_numpy_allocates_them(artifact: Path) -> None:
    from tests.security.hostile import npz_with_declared_shape

    npz_with_declared_shape(artifact / "params.npz", "p00000", (10**6, 10**6))
    edit_manifest(
        artifact, calling_convention="inputs+params", params={"file": "params.npz", "count": 1}
    )
    with pytest.raises(BadInputError, match="more than its data"):
        Artifact.open(artifact).load_params()
    np.savez(artifact / "params.npz", p00001=np.zeros(3, np.float32))
    with pytest.raises(BadInputError, match="lacks p00000"):
        Artifact.open(artifact).load_params()
