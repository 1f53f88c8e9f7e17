"""Build-system dependency files: what ``detc compile --depfile FILE`` writes for Make and Ninja.

A depfile is one Make rule, ``TARGET: DEP DEP ...``: the build system reruns the compile when any
listed file is newer than TARGET (the artifact's manifest.json). It lists what the compile read:
the model, the ONNX external data files beside it, the spec and config files, and every folder a
pass option names (calibration images, a dataset) with the files inside it — the folder itself
too, so that adding or removing an image reruns the compile.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from detc.compiler.fileio import write_text_atomically


def _external_data_files(model: Path) -> list[Path]:
    if model.suffix.lower() != ".onnx":
        return []
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # the compile itself says what is wrong with the model
        return []
    locations: list[Path] = []
    for tensor in _graph_tensors(proto.graph):
        if uses_external_data(tensor):
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if "location" in entries:
                locations.append(model.parent / entries["location"])
    return locations


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Initializers and tensor attributes of ``graph`` and its subgraphs (If, Loop, Scan)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def _folder_contents(folder: Path) -> list[Path]:
    """``folder``, its subfolders and their files, hidden ones left out (editors' and tools'
    scratch files must not rebuild a model)."""
    found = [folder]
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        found.append(path)
    return found


def _pipeline_paths(pipeline: str | None) -> list[Path]:
    """Existing files and folders that options of ``pipeline`` name (calib=DIR, data=DIR, …)."""
    if not pipeline:
        return []
    from detc.compiler.ir.pipeline import parse_pipeline

    paths = []
    for step in parse_pipeline(pipeline).steps:
        for _, value in step.options:
            candidate = Path(value)
            if value and (candidate.is_file() or candidate.is_dir()):
                paths.append(candidate)
    return paths


def compile_dependencies(
    model: Path,
    *,
    pipeline: str | None = None,
    spec: Path | None = None,
    config: Path | None = None,
    extra: Iterable[Path] = (),
) -> list[Path]:
    """The files a compile of ``model`` with ``pipeline`` (the text after --config and --calib
    were applied) reads, in a stable order without repeats, as the paths were given."""
    model = Path(model)
    candidates: list[Path] = [model, *_external_data_files(model)]
    candidates += [Path(p) for p in (spec, config) if p is not None]
    for path in [*_pipeline_paths(pipeline), *map(Path, extra)]:
        candidates += _folder_contents(path) if path.is_dir() else [path]
    unique: dict[str, Path] = {}
    for path in candidates:
        unique.setdefault(str(path), path)
    return list(unique.values())


def escape_make_path(path: Path | str) -> str:
    """``path`` as one word of a Make rule: ``$`` doubled, spaces and ``#`` escaped with a
    backslash, as GNU Make and Ninja's depfile reader expect."""
    text = str(path)
    if any(c in text for c in "\n\r"):
        raise ValueError(f"a depfile cannot name {text!r}: it holds a line break")
    escaped = ""
    for char in text:
        if char == "$":
            escaped += "$$"
        elif char in " #":
            escaped += "\\" + char
        else:
            escaped += char
    return escaped


def depfile_text(target: Path | str, dependencies: Sequence[Path | str]) -> str:
    """One rule, a dependency per continuation line."""
    lines = [f"{escape_make_path(target)}:"]
    lines += [f"  {escape_make_path(dep)}" for dep in dependencies]
    return " \\\n".join(lines) + "\n"


def write_depfile(path: Path, target: Path | str, dependencies: Sequence[Path | str]) -> None:
    """Write the depfile ``path`` (atomically: a build system never reads half a rule)."""
    write_text_atomically(Path(path), depfile_text(target, dependencies))
