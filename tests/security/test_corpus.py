"""The hostile-input corpus: every case is a bad ONNX file, .pt2 archive, artifact folder, CLI
argument or output location, generated here, and ``detc`` must refuse each the same way:

* the documented exit code (2: bad input),
* exactly one line on stderr, naming the file (or argument) and the problem,
* no Python traceback,
* no file created, changed or removed outside ``-o`` (the run's folder, HOME, cache and TMPDIR
  are snapshotted),
* no payload run (a library constructor or a pickle that would create a marker file),
* bounded time and memory.

The cases run side by side (a module fixture), each in a folder of its own; one test per case
asserts the above on its result.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.security.hostile import (
    MEMORY_LIMIT_BYTES,
    TIME_LIMIT_S,
    Run,
    build_evil_library,
    conv_model,
    edit_manifest,
    manifest_of,
    npz_with_declared_shape,
    rewrite_zip,
    run_detc,
    save_with_external_data,
    single_node_model,
    with_node_name_bytes,
)


@dataclass
class Resources:
    """What the cases share, built once: a valid model, artifact and .pt2, and payloads."""

    root: Path
    model: Path
    artifact: Path
    evil_library: Path | None
    pt2: Path | None
    pickle_payload: bytes | None
    #: files a payload creates when it runs
    markers: list[Path] = field(default_factory=list)


@dataclass
class Invocation:
    args: list[str]
    #: what the error line must name (a path or argument as given on the command line)
    names: str
    output: str | None = None
    env: dict[str, str] | None = None


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # onnx | pt2 | artifact | cli | output
    setup: Callable[[Path, Resources], Invocation]
    #: a regular expression the error line must match (the problem)
    says: str
    needs: str | None = None  # "torch" | "cc": skipped without it
    code: int = 2


# ---- the cases ----------------------------------------------------------------------------


def _model_file(folder: Path, name: str, data: bytes | onnx.ModelProto) -> str:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return name


def _compile(model: str, *extra: str) -> Invocation:
    return Invocation(["compile", model, "-o", "out", "--quiet", *extra], names=model, output="out")


def _onnx(data: Callable[[], bytes | onnx.ModelProto], *extra: str) -> Callable:
    def setup(folder: Path, res: Resources) -> Invocation:
        return _compile(_model_file(folder, "model.onnx", data()), *extra)

    return setup


def _external(location: str, prepare: Callable[[Path], None] | None = None) -> Callable:
    def setup(folder: Path, res: Resources) -> Invocation:
        path = save_with_external_data(conv_model(), folder / "m", location)
        if prepare is not None:
            prepare(folder / "m")
        return _compile(str(path.relative_to(folder)))

    return setup


def _outside_symlink(model_dir: Path) -> None:
    (model_dir.parent / "secret.bin").write_bytes((model_dir / "weights.bin").read_bytes())
    (model_dir / "link.bin").symlink_to(model_dir.parent / "secret.bin")


def _hard_link(model_dir: Path) -> None:
    os.link(model_dir / "weights.bin", model_dir / "linked.bin")


def _conv_with(**attributes: object) -> onnx.ModelProto:
    model = conv_model()
    node = model.graph.node[0]
    for key, value in attributes.items():
        node.attribute.append(onnx.helper.make_attribute(key, value))
    return model


def _truncated() -> bytes:
    data = conv_model().SerializeToString()
    return data[: len(data) // 2]


def _inconsistent() -> onnx.ModelProto:
    return single_node_model(
        "Add", [("a", [1, 3, 8, 8]), ("b", [1, 5, 8, 8])], [1, 3, 8, 8], node_name="add"
    )


def _undefined_input() -> onnx.ModelProto:
    model = conv_model()
    model.graph.node[1].input[0] = "nowhere"
    return model


def _short_initializer() -> onnx.ModelProto:
    # the weight declares 4x3x3x3 floats and holds 12: the checker lets it through
    model = conv_model()
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:48]
    return model


def _unknown_element_type() -> onnx.ModelProto:
    model = conv_model()
    model.graph.input[0].type.tensor_type.elem_type = 65  # no ONNX version defines it
    return model


def _dangerous_name() -> onnx.ModelProto:
    # a screen-clearing, window-retitling name on an op TVM cannot import
    return single_node_model(
        "Col2Im",
        [("x", [1, 1, 9])],
        [1, 1, 3, 3],
        initializers={"s": np.array([3, 3], np.int64), "k": np.array([1, 1], np.int64)},
        opset=18,
        node_name="\x1b[2J\x1b]0;pwned\x07",
    )


def _unsupported() -> onnx.ModelProto:
    return single_node_model(
        "Col2Im",
        [("x", [1, 1, 9])],
        [1, 1, 3, 3],
        initializers={"s": np.array([3, 3], np.int64), "k": np.array([1, 1], np.int64)},
        opset=18,
        node_name="fold",
    )


def _pt2(replace: Mapping[str, bytes | None] | None = None, raw: bytes | None = None) -> Callable:
    def setup(folder: Path, res: Resources) -> Invocation:
        path = folder / "model.pt2"
        if raw is not None:
            path.write_bytes(raw)
        else:
            assert res.pt2 is not None
            rewrite_zip(res.pt2, path, replace or {})
        return Invocation(["import", "model.pt2", "-o", "out.onnx"], "model.pt2", "out.onnx")

    return setup


def _pt2_pickle_payload(folder: Path, res: Resources) -> Invocation:
    assert res.pickle_payload is not None
    return _pt2({"data/sample_inputs/model.pt": res.pickle_payload})(folder, res)


def _pt2_pickled_weights(folder: Path, res: Resources) -> Invocation:
    import json

    assert res.pt2 is not None
    with zipfile.ZipFile(res.pt2) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(archive.read(name))
    for entry in config["config"].values():
        entry["use_pickle"] = True
    replaced = {"data/weights/model_weights_config.json": json.dumps(config).encode()}
    return _pt2(replaced)(folder, res)


def _pt2_bomb(folder: Path, res: Resources) -> Invocation:
    with zipfile.ZipFile(folder / "model.pt2", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/archive_format", "pt2")
        archive.writestr("m/data/weights/weight_0", bytes(64 * 1024**2))
    return Invocation(["import", "model.pt2", "-o", "out.onnx"], "model.pt2", "out.onnx")


def _artifact(
    change: Callable[[Path, Resources], None], verb: str = "verify", *extra: str
) -> Callable:
    def setup(folder: Path, res: Resources) -> Invocation:
        artifact = folder / "art"
        shutil.copytree(res.artifact, artifact, symlinks=True)
        change(artifact, res)
        return Invocation([verb, "art", *extra], names="art")

    return setup


def _manifest(**changes: object) -> Callable[[Path, Resources], None]:
    return lambda artifact, res: edit_manifest(artifact, **changes)


def _library_outside(absolute: bool) -> Callable[[Path, Resources], None]:
    def change(artifact: Path, res: Resources) -> None:
        assert res.evil_library is not None
        shutil.copy(res.evil_library, artifact.parent / "evil.so")
        name = str(artifact.parent / "evil.so") if absolute else "../evil.so"
        edit_manifest(artifact, library=name)

    return change


def _library_symlink_out(artifact: Path, res: Resources) -> None:
    assert res.evil_library is not None
    shutil.copy(res.evil_library, artifact.parent / "evil.so")
    (artifact / "model.so").unlink()
    (artifact / "model.so").symlink_to(artifact.parent / "evil.so")


def _library_replaced(artifact: Path, res: Resources) -> None:
    assert res.evil_library is not None
    shutil.copy(res.evil_library, artifact / "model.so")


def _reference_tampered(artifact: Path, res: Resources) -> None:
    onnx.save(conv_model(seed=7), artifact / "reference.onnx")


def _reference_outside(artifact: Path, res: Resources) -> None:
    # an artifact without a kept reference whose source.path names a model elsewhere: that
    # file must not become the reference
    (artifact / "reference.onnx").unlink()
    onnx.save(conv_model(seed=9), artifact.parent / "elsewhere.onnx")
    source = {"path": str(artifact.parent / "elsewhere.onnx"), "sha256": "0" * 64, "onnx": None}
    edit_manifest(artifact, source=source)


def _input_shape(shape: list) -> Callable[[Path, Resources], None]:
    def change(artifact: Path, res: Resources) -> None:
        inputs = manifest_of(artifact)["inputs"]
        inputs[0]["shape"] = shape
        edit_manifest(artifact, inputs=inputs)

    return change


def _input_dtype(artifact: Path, res: Resources) -> None:
    inputs = manifest_of(artifact)["inputs"]
    inputs[0]["dtype"] = "object"
    edit_manifest(artifact, inputs=inputs)


def _params_declaring_too_much(artifact: Path, res: Resources) -> None:
    npz_with_declared_shape(artifact / "params.npz", "p00000", (10**6, 10**6))
    edit_manifest(
        artifact,
        calling_convention="inputs+params",
        params={"file": "params.npz", "count": 1},
    )


def _truncate_manifest(artifact: Path, res: Resources) -> None:
    text = (artifact / "manifest.json").read_text()
    (artifact / "manifest.json").write_text(text[: len(text) // 2])


def _huge_manifest(artifact: Path, res: Resources) -> None:
    with (artifact / "manifest.json").open("w") as stream:
        stream.write('{"format": "detc-artifact", "padding": "')
        stream.write("x" * (20 * 1024**2))
        stream.write('"}')


def _library_is_a_folder(artifact: Path, res: Resources) -> None:
    (artifact / "model.so").unlink()
    (artifact / "model.so").mkdir()


def _feeds(shape: tuple[int, ...], dtype: str = "float32", pickled: bool = False) -> Callable:
    def setup(folder: Path, res: Resources) -> Invocation:
        shutil.copytree(res.artifact, folder / "art")
        if pickled:
            np.save(folder / "feeds.npz", np.array([object()], dtype=object), allow_pickle=True)
            os.replace(folder / "feeds.npz.npy", folder / "feeds.npz")
        else:
            np.savez(folder / "feeds.npz", x=np.zeros(shape, dtype))
        return Invocation(["verify", "art", "--inputs", "feeds.npz"], names="feeds.npz")

    return setup


def _cli(args: list[str], names: str, output: str | None = None) -> Callable:
    def setup(folder: Path, res: Resources) -> Invocation:
        shutil.copy(res.model, folder / "model.onnx")
        return Invocation(list(args), names=names, output=output)

    return setup


def _output_under_a_file(folder: Path, res: Resources) -> Invocation:
    shutil.copy(res.model, folder / "model.onnx")
    return Invocation(
        ["compile", "--quiet", "model.onnx", "-o", "model.onnx/out"], names="model.onnx"
    )


def _output_read_only(folder: Path, res: Resources) -> Invocation:
    shutil.copy(res.model, folder / "model.onnx")
    if os.geteuid() == 0:  # root writes through permissions: /proc refuses everyone
        return Invocation(
            ["compile", "--quiet", "model.onnx", "-o", "/proc/detc-out"], "/proc/detc-out"
        )
    (folder / "locked").mkdir()
    (folder / "locked").chmod(0o555)
    return Invocation(["compile", "--quiet", "model.onnx", "-o", "locked/out"], names="locked/out")


def _output_name_too_long(folder: Path, res: Resources) -> Invocation:
    shutil.copy(res.model, folder / "model.onnx")
    name = "o" * 250
    return Invocation(["compile", "--quiet", "model.onnx", "-o", name], names=name[:40])


def _output_not_an_artifact(folder: Path, res: Resources) -> Invocation:
    shutil.copy(res.model, folder / "model.onnx")
    (folder / "precious").mkdir()
    (folder / "precious" / "notes.txt").write_text("keep me")
    return Invocation(["compile", "--quiet", "model.onnx", "-o", "precious"], names="precious")


def _import_under_a_file(folder: Path, res: Resources) -> Invocation:
    shutil.copy(res.model, folder / "model.onnx")
    return Invocation(["import", "model.onnx", "-o", "model.onnx/x.onnx"], names="x.onnx")


def _cases() -> list[Case]:
    pickle = b"\x80\x04\x95" + bytes(32)
    return [
        # ONNX files
        Case("onnx-empty", "onnx", _onnx(lambda: b""), "empty"),
        Case("onnx-random-bytes", "onnx", _onnx(lambda: bytes(range(256)) * 8), "not a valid"),
        Case("onnx-truncated", "onnx", _onnx(_truncated), "not a valid|truncated"),
        Case("onnx-pickle", "onnx", _onnx(lambda: pickle), "pickle"),
        Case("onnx-zip", "onnx", _onnx(lambda: b"PK\x03\x04" + bytes(60)), "zip archive"),
        Case("onnx-ext-absolute", "onnx", _external("/etc/passwd"), "absolute"),
        Case("onnx-ext-parent", "onnx", _external("../secret.bin"), "leaving"),
        Case("onnx-ext-symlink", "onnx", _external("link.bin", _outside_symlink), "outside"),
        Case("onnx-ext-hard-link", "onnx", _external("linked.bin", _hard_link), "hard link"),
        Case("onnx-ext-nul", "onnx", _external("weights\x00.bin"), "NUL byte"),
        Case("onnx-ext-missing", "onnx", _external("gone.bin"), "not found"),
        Case(
            "onnx-name-not-utf8",
            "onnx",
            _onnx(lambda: with_node_name_bytes(conv_model(), b"\xff\xfe")),
            "not UTF-8",
        ),
        Case("onnx-name-escapes", "onnx", _onnx(_dangerous_name), r"\\x1b\[2J"),
        Case("onnx-unsupported-op", "onnx", _onnx(_unsupported), "Col2Im"),
        Case(
            "onnx-opset-99",
            "onnx",
            _onnx(
                lambda: onnx.helper.make_model(
                    conv_model().graph,
                    opset_imports=[onnx.helper.make_opsetid("", 99)],
                    ir_version=9,
                )
            ),
            "opset",
        ),
        Case(
            "onnx-negative-dilation",
            "onnx",
            _onnx(lambda: _conv_with(dilations=[-1, -1])),
            "dilation",
        ),
        Case("onnx-inconsistent-shapes", "onnx", _onnx(_inconsistent), "shape inference"),
        Case("onnx-initializer-data-short", "onnx", _onnx(_short_initializer), "does not fit"),
        Case("onnx-unknown-element-type", "onnx", _onnx(_unknown_element_type), "malformed"),
        Case("onnx-undefined-input", "onnx", _onnx(_undefined_input), "checker|nowhere"),
        Case(
            "onnx-zero-sized-input",
            "onnx",
            _onnx(lambda: conv_model(batch=0)),
            "zero-sized",
        ),
        Case(
            "onnx-dynamic-input",
            "onnx",
            _onnx(lambda: conv_model(batch="N")),
            "dynamic input",
        ),
        Case(
            "onnx-over-size-limit",
            "onnx",
            lambda folder, res: Invocation(
                _compile(_model_file(folder, "model.onnx", conv_model())).args,
                "model.onnx",
                "out",
                {"DETC_MAX_MODEL_BYTES": "100"},
            ),
            "limit",
        ),
        # .pt2 archives
        Case("pt2-pickle-payload", "pt2", _pt2_pickle_payload, "pickle|sample_inputs", "torch"),
        Case("pt2-pickled-weights", "pt2", _pt2_pickled_weights, "pickled", "torch"),
        Case("pt2-not-a-zip", "pt2", _pt2(raw=b"not a zip at all"), "not a zip"),
        Case("pt2-zip-bomb", "pt2", _pt2_bomb, "zip bomb"),
        Case(
            "pt2-no-archive-format", "pt2", _pt2({"archive_format": None}), "torch.export", "torch"
        ),
        Case(
            "pt2-garbage-json",
            "pt2",
            _pt2({"model_weights_config.json": b"{garbage"}),
            "JSON",
            "torch",
        ),
        Case(
            "pt2-garbage-model",
            "pt2",
            _pt2({"models/model.json": b'{"graph_module": 3'}),
            "torch.export",
            "torch",
        ),
        # artifact folders
        Case(
            "artifact-missing-manifest",
            "artifact",
            _artifact(lambda a, r: (a / "manifest.json").unlink()),
            "not a detc artifact",
        ),
        Case("artifact-truncated-manifest", "artifact", _artifact(_truncate_manifest), "corrupt"),
        Case("artifact-huge-manifest", "artifact", _artifact(_huge_manifest), "too large"),
        Case(
            "artifact-format-version",
            "artifact",
            _artifact(_manifest(format_version=99)),
            "format_version",
        ),
        Case(
            "artifact-library-absolute",
            "artifact",
            _artifact(_library_outside(True)),
            "not a file inside",
            "cc",
        ),
        Case(
            "artifact-library-parent",
            "artifact",
            _artifact(_library_outside(False)),
            "not a file inside",
            "cc",
        ),
        Case(
            "artifact-library-symlink-out",
            "artifact",
            _artifact(_library_symlink_out),
            "not a file inside",
            "cc",
        ),
        Case(
            "artifact-library-replaced",
            "artifact",
            _artifact(_library_replaced),
            "does not match its manifest",
            "cc",
        ),
        Case(
            "artifact-library-replaced-bench",
            "artifact",
            _artifact(_library_replaced, "bench", "--runs", "2"),
            "does not match its manifest",
            "cc",
        ),
        Case(
            "artifact-no-library-digest",
            "artifact",
            _artifact(_manifest(library_sha256=None)),
            "sha256",
        ),
        Case(
            "artifact-library-a-folder",
            "artifact",
            _artifact(_library_is_a_folder),
            "regular file|missing",
        ),
        Case(
            "artifact-params-outside",
            "artifact",
            _artifact(_manifest(params={"file": "../../params.npz", "count": 0})),
            "not a file inside",
        ),
        Case(
            "artifact-params-declare-too-much",
            "artifact",
            _artifact(_params_declaring_too_much),
            "more than its data",
        ),
        Case(
            "artifact-reference-tampered",
            "artifact",
            _artifact(_reference_tampered),
            "reference.onnx does not match",
        ),
        Case(
            "artifact-reference-outside",
            "artifact",
            _artifact(_reference_outside),
            "keeps no reference",
        ),
        Case(
            "artifact-reference-path-escape",
            "artifact",
            _artifact(
                _manifest(
                    source={
                        "path": None,
                        "sha256": "0" * 64,
                        "onnx": "../../x.onnx",
                        "onnx_sha256": "0" * 64,
                    }
                )
            ),
            "not a file inside",
        ),
        Case(
            "artifact-quantized-reference-outside",
            "artifact",
            _artifact(
                _manifest(
                    quantization={
                        "mode": "int8",
                        "reference": {"file": "/etc/passwd", "sha256": "0" * 64},
                    }
                )
            ),
            "not a file inside",
        ),
        Case(
            "artifact-input-112-gib",
            "artifact",
            _artifact(_input_shape([1, 3, 4 * 1024, 7 * 1024**2])),
            "limit",
        ),
        Case(
            "artifact-input-negative",
            "artifact",
            _artifact(_input_shape([1, 3, -8, 8])),
            "malformed",
        ),
        Case(
            "artifact-input-text-shape",
            "artifact",
            _artifact(_input_shape("abc")),  # type: ignore[arg-type]
            "malformed",
        ),
        Case("artifact-input-dtype", "artifact", _artifact(_input_dtype), "malformed"),
        Case(
            "artifact-not-a-folder",
            "artifact",
            lambda folder, res: Invocation(["verify", "nowhere"], "nowhere"),
            "nowhere",
        ),
        # CLI arguments
        Case("cli-inputs-wrong-shape", "cli", _feeds((1, 3, 5, 5)), "takes"),
        Case("cli-inputs-wrong-dtype", "cli", _feeds((1, 3, 8, 8), "float64"), "takes"),
        Case("cli-inputs-pickled", "cli", _feeds((1,), pickled=True), "npz"),
        Case(
            "cli-input-shape-over-int64",
            "cli",
            _cli(
                [
                    "compile",
                    "--quiet",
                    "model.onnx",
                    "--input-shape",
                    "x:1x3x8x99999999999999999999",
                    "-o",
                    "out",
                ],
                "99999999999999999999",
                "out",
            ),
            "between 1 and",
        ),
        Case(
            "cli-input-shape-zero",
            "cli",
            _cli(
                ["compile", "--quiet", "model.onnx", "--input-shape", "x:0x3x8x8", "-o", "out"],
                "x:0x3x8x8",
                "out",
            ),
            "between 1 and",
        ),
        Case(
            "cli-input-shape-unknown",
            "cli",
            _cli(
                [
                    "compile",
                    "--quiet",
                    "model.onnx",
                    "--input-shape",
                    "images:1x3x8x8",
                    "-o",
                    "out",
                ],
                "model.onnx",
                "out",
            ),
            "images",
        ),
        Case(
            "cli-input-shape-malformed",
            "cli",
            _cli(
                ["compile", "--quiet", "model.onnx", "--input-shape", "x:1xax8", "-o", "out"],
                "x:1xax8",
                "out",
            ),
            "expected NAME",
        ),
        Case(
            "cli-unknown-target",
            "cli",
            _cli(
                ["compile", "--quiet", "model.onnx", "--target", "sparc", "-o", "out"],
                "sparc",
                "out",
            ),
            "unknown target",
        ),
        Case(
            "cli-unknown-pass",
            "cli",
            _cli(
                ["opt", "model.onnx", "-p", "no-such-pass", "-o", "o.onnx"],
                "no-such-pass",
                "o.onnx",
            ),
            "unknown pass",
        ),
        Case(
            "cli-unknown-option",
            "cli",
            _cli(["compile", "--quiet", "model.onnx", "--bogus"], "--bogus"),
            "No such option",
        ),
        Case(
            "cli-emulate-and-device",
            "cli",
            lambda folder, res: Invocation(
                ["verify", str(res.artifact), "--emulate", "--device", "rpc://127.0.0.1:1"],
                "--device",
            ),
            "exclude each other",
        ),
        Case(
            "cli-missing-model",
            "cli",
            _cli(["compile", "--quiet", "absent.onnx", "-o", "out"], "absent.onnx", "out"),
            "no such file",
        ),
        Case(
            "cli-model-is-a-folder",
            "cli",
            _cli(["compile", "--quiet", ".", "-o", "out"], ".", "out"),
            "not a regular file",
        ),
        Case(
            "cli-pickled-torch",
            "cli",
            lambda folder, res: Invocation(
                [
                    "compile",
                    "--quiet",
                    _model_file(folder, "model.pt", b"\x80\x02pickle"),
                    "-o",
                    "out",
                ],
                "model.pt",
                "out",
            ),
            "pickled",
        ),
        # output locations
        Case("output-under-a-file", "output", _output_under_a_file, "is a file"),
        Case("output-read-only", "output", _output_read_only, "cannot create"),
        Case("output-name-too-long", "output", _output_name_too_long, "too long"),
        Case("output-not-an-artifact", "output", _output_not_an_artifact, "not a detc artifact"),
        Case("output-import-under-a-file", "output", _import_under_a_file, "is a file"),
    ]


CASES = _cases()


# ---- running them -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resources(tmp_path_factory: pytest.TempPathFactory) -> Resources:
    root = tmp_path_factory.mktemp("corpus-resources")
    model = root / "conv.onnx"
    onnx.save(conv_model(), model)
    compiled = run_detc(["compile", "conv.onnx", "-o", "artifact", "--quiet"], root)
    assert compiled.returncode == 0, compiled.stderr
    library_marker = root / "library-payload-ran"
    pickle_marker = root / "pickle-payload-ran"
    evil = build_evil_library(root, library_marker)
    pt2 = payload = None
    try:
        import torch
    except ImportError:  # the .pt2 cases skip
        pass
    else:
        pt2 = root / "conv.pt2"
        module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        torch.export.save(torch.export.export(module.eval(), (torch.randn(1, 3, 8, 8),)), pt2)
        payload_file = root / "payload.pt"
        torch.save((_Payload(pickle_marker),), payload_file)
        payload = payload_file.read_bytes()
    return Resources(
        root, model, root / "artifact", evil, pt2, payload, [library_marker, pickle_marker]
    )


class _Payload:
    """Unpickling this creates a marker file: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _available(case: Case, res: Resources) -> str | None:
    if case.needs == "torch" and res.pt2 is None:
        return "torch is not installed"
    if case.needs == "cc" and res.evil_library is None:
        return "no C compiler for the payload library"
    return None


@pytest.fixture(scope="module")
def corpus_runs(
    resources: Resources, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Run, Invocation] | str]:
    root = tmp_path_factory.mktemp("corpus")

    def run(case: Case) -> tuple[Run, Invocation] | str:
        missing = _available(case, resources)
        if missing is not None:
            return missing
        folder = root / case.name
        folder.mkdir()
        invocation = case.setup(folder, resources)
        output = folder / invocation.output if invocation.output else None
        return run_detc(invocation.args, folder, output=output, env=invocation.env), invocation

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip([c.name for c in CASES], pool.map(run, CASES), strict=True))


def test_the_corpus_is_large_and_varied() -> None:
    kinds = {case.kind for case in CASES}
    assert len(CASES) >= 40 and kinds == {"onnx", "pt2", "artifact", "cli", "output"}
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_hostile_input_is_a_one_line_refusal(
    case: Case, corpus_runs: dict[str, tuple[Run, Invocation] | str], resources: Resources
) -> None:
    outcome = corpus_runs[case.name]
    if isinstance(outcome, str):
        pytest.skip(outcome)
    run, invocation = outcome
    context = f"{case.name}: exit {run.returncode}, stderr:\n{run.stderr}"
    assert run.returncode == case.code, context
    assert "Traceback" not in run.stderr + run.stdout, context
    assert len(run.stderr_lines) == 1, context
    line = run.stderr_lines[0]
    assert line.startswith("detc: error: "), context
    assert invocation.names in line, f"the line does not name {invocation.names!r}: {context}"
    import re

    assert re.search(case.says, line), f"the line does not say /{case.says}/: {context}"
    assert "\x1b" not in run.stderr and "\x07" not in run.stderr, context
    assert run.touched == [], f"{case.name} touched {run.touched} outside -o"
    assert not any(marker.exists() for marker in resources.markers), f"{case.name}: payload ran"
    assert run.seconds < TIME_LIMIT_S, context
    assert run.max_rss_bytes < MEMORY_LIMIT_BYTES, f"{case.name}: {run.max_rss_bytes:,} bytes"
