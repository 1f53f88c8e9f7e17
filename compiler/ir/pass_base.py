"""What a detc pass is: a named, typed ``onnx_ir`` pass that can say why it did not fire.

Every pass — built-in or from a plugin registered under the entry-point group ``detc.passes`` —
subclasses :class:`DetcPass` (or :class:`RewritePass` for match/rewrite passes) and declares:

* ``name``: kebab-case, what pipelines and the CLI call it (``fold-conv-bn``);
* ``exact``: True when the rewrite preserves the function in real arithmetic; approximate passes
  (pruning, low-rank, quantization) change numbers and need an explicit accuracy budget;
* ``Options``: a frozen dataclass of typed options, parsed from pipeline text ``name{key=value}``;
* optionally, which of those options the tools fill in: ``calibration_option`` (the folder of
  calibration images that ``--calib DIR`` sets) and ``sweep_option`` (what ``detc sweep`` varies);
* ``report``: what the last run decided (approximate passes), with ``to_dict()`` and ``table()``.

A pass is in place: ``call(model)`` mutates ``model`` and returns ``PassResult(model, modified)``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import onnx_ir as ir
import onnx_ir.passes

from detc.compiler.errors import BadInputError

PassResult = onnx_ir.passes.PassResult

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class NoOptions:
    """The options of a pass that takes none."""


@dataclass(frozen=True)
class NoMatch:
    """Why a pass does not fire on a candidate node: one line a user can act on."""

    reason: str

    def __bool__(self) -> bool:  # lets ``if not match:`` read naturally in passes
        return False


@dataclass(frozen=True)
class Candidate:
    """One line of ``detc explain``: a node the pass looked at, and whether it fires there."""

    node: str
    op_type: str
    fires: bool
    reason: str = ""

    def __str__(self) -> str:
        verdict = "fires" if self.fires else f"does not fire: {self.reason}"
        return f"{self.op_type} '{self.node}': {verdict}"


class PassReport(Protocol):
    """What an approximate pass decided in its last run: for the manifest and the terminal."""

    def to_dict(self) -> dict[str, Any]: ...

    def table(self) -> str: ...


def node_label(node: ir.Node) -> str:
    """How messages name a node: its name, or its first output when it has none."""
    if node.name:
        return node.name
    if node.outputs and node.outputs[0].name:
        return f"<unnamed, output {node.outputs[0].name}>"
    return "<unnamed>"


class DetcPass(onnx_ir.passes.InPlacePass):
    """Base class of every detc pass. Subclasses set the class attributes and implement ``call``."""

    name: ClassVar[str]
    exact: ClassVar[bool]
    Options: ClassVar[type] = NoOptions
    #: the option naming a folder of calibration images the pass reads: ``--calib DIR`` sets it
    #: on every step of a pipeline that leaves it unset; None: the pass reads no images
    calibration_option: ClassVar[str | None] = None
    #: the option ``detc sweep`` varies unless told another (an approximate pass's strength)
    sweep_option: ClassVar[str | None] = None
    #: what the last run decided, once the pass has run (approximate passes set it)
    report: PassReport | None = None
    #: True: :func:`detc.compiler.ir.pipeline.run_pipeline` sets :attr:`original` before ``call``
    #: (recovery passes distil from it); False: the runner keeps no copy for this pass
    wants_original: ClassVar[bool] = False
    #: the model as it entered the first approximate pass before this one in the pipeline (the
    #: function those passes were asked to keep); None: no approximate pass ran before it
    original: ir.Model | None = None

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        """One line of what the pass does: the first line of its docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def validate_declaration(cls) -> None:
        """Refuse a pass class that does not declare what the pass manager relies on."""
        where = f"{cls.__module__}.{cls.__qualname__}"
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _KEBAB.match(name):
            raise BadInputError(f"pass class {where}: `name` must be kebab-case, got {name!r}")
        if not isinstance(getattr(cls, "exact", None), bool):
            raise BadInputError(f"pass class {where} ({name}): declare `exact = True/False`")
        if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise BadInputError(f"pass class {where} ({name}): `Options` must be frozen dataclass")
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        for kind in ("calibration_option", "sweep_option"):
            declared = getattr(cls, kind)
            if declared is not None and declared not in fields:
                raise BadInputError(
                    f"pass class {where} ({name}): `{kind} = {declared!r}` is not one of its "
                    f"options ({', '.join(sorted(fields)) or 'none'})"
                )

    @classmethod
    def from_text_options(cls, raw: Iterable[tuple[str, str]]) -> DetcPass:
        """Build the pass from ``key=value`` pairs as written in a pipeline string."""
        return cls(parse_options(cls, raw))

    def explain(self, model: ir.Model) -> list[Candidate]:
        """For ``detc explain``: every candidate node and whether the pass fires on it.

        Passes that delegate to a whole-graph optimizer cannot attribute decisions to nodes and
        return an empty list; ``detc explain`` then says so.
        """
        del model
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


MatchT = TypeVar("MatchT")


class RewritePass(DetcPass, Generic[MatchT]):
    """A pass written as a pure ``match`` and a mutating ``rewrite``, anchored on some op types.

    ``match`` must never mutate: it returns the facts ``rewrite`` needs, or a :class:`NoMatch`
    saying why the pattern does not apply. All mutation happens in ``rewrite``. Only the main graph
    is rewritten: detectors exported for deployment have no control-flow subgraphs worth fusing.
    """

    anchor_op_types: ClassVar[tuple[str, ...]]

    def match(self, node: ir.Node) -> MatchT | NoMatch:
        raise NotImplementedError

    def rewrite(self, match: MatchT, graph: ir.Graph) -> None:
        raise NotImplementedError

    def candidates(self, graph: ir.Graph) -> Iterator[ir.Node]:
        for node in list(graph):
            if node.op_type in self.anchor_op_types and node.domain in ("", "ai.onnx"):
                yield node

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in self.candidates(model.graph):
            if node.graph is None:  # removed by an earlier rewrite in this same run
                continue
            found = self.match(node)
            if isinstance(found, NoMatch):
                continue
            self.rewrite(found, model.graph)
            modified = True
        return PassResult(model, modified)

    def explain(self, model: ir.Model) -> list[Candidate]:
        lines = []
        for node in self.candidates(model.graph):
            found = self.match(node)
            reason = found.reason if isinstance(found, NoMatch) else ""
            lines.append(Candidate(node_label(node), node.op_type, not reason, reason))
        return lines


# --- typed options -------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(pass_name: str, key: str, raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        annotation = members[0]
    try:
        if annotation is bool:
            low = raw.lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError(raw)
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
        if annotation is Path:
            return Path(raw)
        if annotation is str:
            return raw
    except ValueError:
        kind = getattr(annotation, "__name__", str(annotation))
        raise BadInputError(
            f"pass '{pass_name}': option {key}={raw!r} is not a valid {kind}"
        ) from None
    raise BadInputError(f"pass '{pass_name}': option {key} has an unsupported type {annotation!r}")


def parse_options(pass_cls: type[DetcPass], raw: Iterable[tuple[str, str]]) -> Any:
    """Typed options of ``pass_cls`` from ``(key, value)`` text pairs; unknown keys are refused."""
    fields = {f.name: f for f in dataclasses.fields(pass_cls.Options)}
    hints = typing.get_type_hints(pass_cls.Options)
    values: dict[str, Any] = {}
    for key, value in raw:
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise BadInputError(
                f"pass '{pass_cls.name}' has no option '{key}' (its options: {known})"
            )
        if key in values:  # the last one would silently win while str() still shows both
            raise BadInputError(f"pass '{pass_cls.name}': option {key} is given twice")
        values[key] = _convert(pass_cls.name, key, value, hints[key])
    try:
        return pass_cls.Options(**values)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"pass '{pass_cls.name}': {exc}") from None


def describe_options(pass_cls: type[DetcPass]) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, help)`` for each option, for ``detc passes``; the help is the
    field's ``metadata["help"]`` ("" without one)."""
    hints = typing.get_type_hints(pass_cls.Options)
    rows = []
    for f in dataclasses.fields(pass_cls.Options):
        default = "required"
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        hint = hints[f.name]
        name = getattr(hint, "__name__", str(hint)).replace("typing.", "")
        rows.append((f.name, name, default, str(f.metadata.get("help", ""))))
    return rows
