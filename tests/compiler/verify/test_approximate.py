"""A pruned build verifies like an int8 one: tensors against the graph it compiled (kept in the
artifact), accuracy against the source model under an mAP budget (issue: real detectors, 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import detc
from detc.compiler.demo.run import demo_asset_paths
from detc.compiler.demo.synth import generate_dataset


@pytest.fixture(scope="module")
def pruned_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pruned")
    data = generate_dataset(root / "data", n=8, seed=3)
    model, _spec = demo_asset_paths()
    out = root / "art"
    pipeline = f"default,prune{{mac_reduction=0.3,calib={data}}}"
    detc.compile_model(model, target="x86", out_dir=out, pipeline=pipeline, progress=False)
    return out, data


def test_the_artifact_keeps_the_graph_it_compiled(pruned_build: tuple[Path, Path]) -> None:
    artifact, _ = pruned_build
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["approximate"]["passes"] == ["prune"]
    assert (artifact / manifest["approximate"]["reference"]["file"]).is_file()


def test_its_tensors_match_the_pruned_graph(pruned_build: tuple[Path, Path]) -> None:
    artifact, _ = pruned_build
    report = detc.verify_artifact(artifact)  # exit 3 before: compared with the unpruned source
    assert report.ok, report.failures
    assert report.transformed_reference is not None
    assert "the graph prune left" in report.tensor_lines()[0]


def test_its_accuracy_is_held_to_the_source_under_the_budget(
    pruned_build: tuple[Path, Path], tmp_path: Path
) -> None:
    artifact, data = pruned_build
    inside = detc.verify_artifact(
        artifact, data=data, max_map_drop=100.0, report_dir=tmp_path / "inside"
    )
    assert inside.ok, inside.failures
    drop = inside.detection.map_drop
    assert drop is not None
    # a budget just below what the prune measurably did (on 8 images it may even gain a little)
    outside = detc.verify_artifact(
        artifact, data=data, max_map_drop=drop - 0.5, report_dir=tmp_path / "outside"
    )
    assert outside.exit_status == 3
    assert any("by prune" in failure for failure in outside.failures), outside.failures
