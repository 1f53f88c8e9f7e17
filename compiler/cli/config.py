"""A whole build stated in one TOML file: ``detc compile --config build.toml``.

    model = "models/yolov5n.onnx"         # paths are relative to this file
    target = "arm:cortex-a76"
    output = "build/yolov5n"
    pipeline = "default,quantize{calib=data/unlabeled,max_map_drop=1.0}"   # or [[passes]] tables
    calib = "data/unlabeled"
    spec = "yolov5n.spec.toml"
    tune = true
    tune_minutes = 20
    tuning_db = "tuning/arm.json"

    [verify]                              # read by `detc verify ARTIFACT --config build.toml`
    data = "data/coco64"
    max_map_drop = 1.0

A top-level key is any option of ``detc opt``, ``compile`` or ``tune`` by its long name (dashes or
underscores), or ``model``; each command takes the keys it has and leaves the others to the
commands that have them. The ``[verify]`` table holds ``detc verify``'s options (its gates).
A key no build command has is an error that names it and the keys that exist, so a typo can
never be silently ignored. Options given on the command line win over the file; the pipeline is
the exception: stating it in both places is refused, as before.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from detc.compiler.errors import BadInputError

#: the commands whose options a config's top level states; ``verify`` reads its own table
BUILD_COMMANDS = ("opt", "compile", "tune")
VERIFY_TABLE = "verify"
#: keys the pipeline loader reads itself (see detc.compiler.ir.pipeline.pipeline_from_config)
PIPELINE_KEYS = ("pipeline", "passes")
#: options that make no sense in a file (they say how to read it, or how to print)
_NOT_FROM_A_FILE = frozenset({"config", "help"})


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML table of ``path``; a missing or malformed file is a one-line BadInputError."""
    from detc.compiler.ir.pipeline import load_config

    return load_config(path)


def _key(name: str) -> str:
    return name.replace("-", "_")


def _settable(command: click.Command) -> dict[str, click.Parameter]:
    """The command's parameters by the key a file names them with: an option's long flag
    (``--input-shape`` → ``input_shape``), an argument's name (``model``)."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name is None or not param.expose_value:
            continue
        long_flags = [_key(o[2:]) for o in param.opts if o.startswith("--")]
        for key in long_flags or [param.name]:
            if key not in _NOT_FROM_A_FILE:
                keys[key] = param
    return keys


def _sibling_commands(ctx: click.Context, names: Iterable[str]) -> list[click.Command]:
    """The build commands of the group ``ctx`` runs under (only ``ctx``'s own when called
    outside the ``detc`` group, as tests do)."""
    group = ctx.parent.command if ctx.parent is not None else None
    if isinstance(group, click.Group):
        found = [group.commands[name] for name in names if name in group.commands]
        if ctx.command not in found:
            found.append(ctx.command)
        return found
    return [ctx.command]


def _unknown_key_error(path: Path, key: str, known: Iterable[str], where: str) -> BadInputError:
    known = sorted(set(known))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return BadInputError(
        f"{path}: unknown key {key!r}{where}{hint}; the keys a build states are: {', '.join(known)}"
    )


def _resolve_paths(value: Any, param: click.Parameter, base: Path) -> Any:
    """Relative paths in the file are relative to the file, wherever detc runs."""
    if not isinstance(param.type, click.Path):
        return value

    def resolve(item: Any) -> Any:
        if isinstance(item, str) and item and not Path(item).is_absolute():
            return str(base / item)
        return item

    return [resolve(v) for v in value] if isinstance(value, list) else resolve(value)


def defaults_from_config(
    path: Path,
    table: Mapping[str, Any],
    command: click.Command,
    siblings: Iterable[click.Command],
    *,
    extra_keys: Iterable[str] = (),
    where: str = "",
) -> dict[str, Any]:
    """The values of ``table`` that ``command`` takes, keyed by parameter name.

    Every key must be a parameter of ``command`` or of one of ``siblings`` (or one of
    ``extra_keys``); anything else raises naming it.
    """
    own = _settable(command)
    known = set(own) | set(extra_keys)
    for sibling in siblings:
        known |= set(_settable(sibling))
    defaults: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = _key(raw_key)
        if key not in known:
            raise _unknown_key_error(path, raw_key, known, where)
        param = own.get(key)
        if param is None or param.name is None:
            continue  # another build command's option
        if isinstance(value, dict):
            raise BadInputError(f"{path}: {raw_key!r}{where} must be a value, not a table")
        if getattr(param, "multiple", False) and not isinstance(value, list):
            value = [value]
        defaults[param.name] = _resolve_paths(value, param, path.parent)
    return defaults


def build_config_callback(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Any:
    """``--config`` of opt, compile and tune: the file's top level becomes the command's
    defaults (eager, so that every other option sees them)."""
    if value is None:
        return None
    config = read_config_file(value)
    table = {k: v for k, v in config.items() if k not in (*PIPELINE_KEYS, VERIFY_TABLE)}
    verify = config.get(VERIFY_TABLE)
    if verify is not None and not isinstance(verify, dict):
        raise BadInputError(f"{value}: {VERIFY_TABLE!r} must be a table ([verify])")
    siblings = _sibling_commands(ctx, BUILD_COMMANDS)
    defaults = defaults_from_config(value, table, ctx.command, siblings)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def verify_config_callback(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Any:
    """``--config`` of verify: the file's ``[verify]`` table becomes verify's defaults."""
    if value is None:
        return None
    config = read_config_file(value)
    table = config.get(VERIFY_TABLE, {})
    if not isinstance(table, dict):
        raise BadInputError(f"{value}: {VERIFY_TABLE!r} must be a table ([verify])")
    defaults = defaults_from_config(value, table, ctx.command, (), where=" in [verify]")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value
