"""The pass registry: built-in passes plus plugins from the entry-point group ``detc.passes``.

A plugin package declares, in its pyproject::

    [project.entry-points."detc.passes"]
    my-pass = "my_package.my_module:MyPass"

and gets exactly the API the built-in passes use (:class:`detc.compiler.DetcPass`).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pass_base import DetcPass

ENTRY_POINT_GROUP = "detc.passes"


@functools.cache
def _registry() -> dict[str, type[DetcPass]]:
    from detc.passes import BUILTIN_PASSES

    found: dict[str, type[DetcPass]] = {}
    for builtin in BUILTIN_PASSES:
        builtin.validate_declaration()
        found[builtin.name] = builtin
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP})"
        try:
            cls: type[DetcPass] = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-in passes down with it
            raise BadInputError(f"{where} failed to import: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, DetcPass)):
            raise BadInputError(f"{where} is not a detc.compiler.DetcPass subclass")
        cls.validate_declaration()
        if cls.name in found and found[cls.name] is not cls:
            raise BadInputError(f"{where}: pass name '{cls.name}' is already taken")
        found[cls.name] = cls
    return found


def refresh_registry() -> None:
    """Forget what was discovered (after installing a plugin in the same process, e.g. in tests)."""
    _registry.cache_clear()


def all_passes() -> dict[str, type[DetcPass]]:
    """Every known pass by name, sorted by name."""
    return dict(sorted(_registry().items()))


def get_pass(name: str) -> type[DetcPass]:
    registry = _registry()
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise BadInputError(f"unknown pass '{name}'; known passes: {known}")
    return registry[name]
