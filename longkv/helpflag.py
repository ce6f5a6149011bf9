"""Typer command classes whose ``--help`` reads as the flag it is.

Typer 0.29 labels the help option ``<bool>`` in every help panel, as if it took
a value; these classes give it no value label, like every other flag here.
Use ``typer.Typer(cls=Group)`` and ``@app.command(cls=Command)``.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup


def _flag(option: Any) -> Any:
    if option is not None:
        option.metavar = ""
    return option


class Command(TyperCommand):
    """A Typer command whose ``--help`` has no value label."""

    def get_help_option(self, ctx: Any) -> Any:
        return _flag(super().get_help_option(ctx))


class Group(TyperGroup):
    """A Typer group whose ``--help`` has no value label."""

    def get_help_option(self, ctx: Any) -> Any:
        return _flag(super().get_help_option(ctx))
