"""CLI verbs for the detection side: synthetic data and the built-in demo."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    del cli
