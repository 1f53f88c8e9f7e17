"""The pass registry: built-in passes plus plugins from the entry-point group ``detc.passes``.

A plugin package declares, in its pyproject::

    [project.entry-points."detc.passes"]
    my-pass = "my_package.my_module:MyPass"

and gets exactly the API the built-in passes use (:class:`detc.compiler.DetcPass`).

A plugin that fails to load (an import error, not a DetcPass, a name already taken) is named in
one warning and left out; detc goes on with the rest. Only a pipeline that asks for a pass of that
plugin's entry-point name fails, and its error says why the plugin did not load.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pass_base import DetcPass

ENTRY_POINT_GROUP = "detc.passes"

logger = logging.getLogger("detc.passes")


@dataclass
class _Registry:
    passes: dict[str, type[DetcPass]] = field(default_factory=dict)
    #: entry-point name → why that plugin was left out
    broken: dict[str, str] = field(default_factory=dict)


def _load_plugin(ep: EntryPoint, found: dict[str, type[DetcPass]]) -> type[DetcPass]:
    where = f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP})"
    try:
        cls = ep.load()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"{where} failed to import: {first}") from None
    if not (isinstance(cls, type) and issubclass(cls, DetcPass)):
        raise BadInputError(f"{where} is not a detc.compiler.DetcPass subclass")
    plugin: type[DetcPass] = cls
    plugin.validate_declaration()
    if plugin.name in found and found[plugin.name] is not plugin:
        raise BadInputError(f"{where}: pass name '{plugin.name}' is already taken")
    return plugin


@functools.cache
def _registry_state() -> _Registry:
    from detc.passes import BUILTIN_PASSES

    state = _Registry()
    for builtin in BUILTIN_PASSES:
        builtin.validate_declaration()
        state.passes[builtin.name] = builtin
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = _load_plugin(ep, state.passes)
        except Exception as exc:  # a broken plugin must not take the built-in passes down with it
            state.broken[ep.name] = str(exc)
            logger.warning("warning: plugin left out: %s", exc)
            continue
        state.passes[cls.name] = cls
    return state


def _registry() -> dict[str, type[DetcPass]]:
    return _registry_state().passes


def refresh_registry() -> None:
    """Forget what was discovered (after installing a plugin in the same process, e.g. in tests)."""
    _registry_state.cache_clear()


def all_passes() -> dict[str, type[DetcPass]]:
    """Every known pass by name, sorted by name."""
    return dict(sorted(_registry().items()))


def get_pass(name: str) -> type[DetcPass]:
    registry = _registry()
    broken = _registry_state().broken
    if name not in registry and name in broken:
        raise BadInputError(f"pass '{name}' is a plugin that could not be loaded: {broken[name]}")
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise BadInputError(f"unknown pass '{name}'; known passes: {known}")
    return registry[name]
