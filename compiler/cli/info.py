"""``detc passes``, ``explain``, ``targets`` and ``doctor``: what detc can do, here, and why a
pass does or does not fire."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import click

from detc.compiler.cli.options import input_shape_option
from detc.compiler.errors import BadInputError


@click.command("passes")
@click.option("-v", "--verbose", is_flag=True, help="Show each pass's options.")
def passes_cmd(verbose: bool) -> None:
    """List every pass: name, exact or approximate, what it does (plugins included)."""
    from detc.compiler.ir.pass_base import describe_options
    from detc.compiler.ir.registry import all_passes

    for name, cls in all_passes().items():
        kind = "exact" if cls.exact else "approx"
        origin = "" if cls.__module__.startswith("detc.") else f"  [{cls.__module__}]"
        click.echo(f"{name:<24} {kind:<7} {cls.summary()}{origin}")
        if verbose:
            for opt_name, kind_name, default, help_text in describe_options(cls):
                click.echo(f"{'':<32}{opt_name}: {kind_name} = {default}")
                for line in textwrap.wrap(help_text, width=68):
                    click.echo(f"{'':<36}{line}")


@click.command("explain")
@click.argument("pass_name", metavar="PASS")
@click.argument("model", type=click.Path(path_type=Path))
@input_shape_option
def explain_cmd(pass_name: str, model: Path, input_shapes: Sequence[str]) -> None:
    """For every candidate node of MODEL, whether PASS fires there and, if not, why."""
    from detc.compiler.frontend import load_model, parse_input_shapes
    from detc.compiler.ir.pipeline import parse_pipeline

    steps = parse_pipeline(pass_name).steps
    if len(steps) != 1:
        raise BadInputError(f"explain takes one pass, got {len(steps)}: {pass_name!r}")
    pass_ = steps[0].instantiate()
    loaded = load_model(model, input_shapes=parse_input_shapes(input_shapes))
    candidates = pass_.explain(loaded.model)
    if not candidates:
        click.echo(
            f"{steps[0].name}: no per-node candidates to explain in {model} "
            "(no anchor nodes, or the pass works on the whole graph)"
        )
        return
    for cand in candidates:
        click.echo(str(cand))
    fires = sum(c.fires for c in candidates)
    click.echo(f"{fires} of {len(candidates)} candidates fire")


@click.command("targets")
def targets_cmd() -> None:
    """List compilation targets and what each enables."""
    from detc.targets import available_targets

    for info in available_targets():
        click.echo(f"{info.name:<22} {info.description}")


@click.command("doctor")
def doctor_cmd() -> None:
    """Report every tool detc can use and what is missing for which target."""
    from detc.targets import doctor as run_doctor

    missing = 0
    for rec in run_doctor():
        found = rec.found or "MISSING"
        missing += rec.found is None and not rec.needed_for.startswith("optional")
        click.echo(f"{rec.tool:<32} {found}")
        click.echo(f"{'':<32}   for: {rec.needed_for}")
        if rec.found is None and rec.install_hint:
            click.echo(f"{'':<32}   install: {rec.install_hint}")
    click.echo(
        "every required tool found" if not missing else f"{missing} tool(s) missing (see above)"
    )
