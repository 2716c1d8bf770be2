"""The CLI's terminal: one rich console, user values printed as text, errors as exit 2."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from garrison.observability import escape_control

__all__ = ["console", "fail", "text"]

console = Console()


def text(value: object) -> str:
    """A value from the store or the user (a run id, a name, an error message) for a
    rich markup string: its markup and control characters shown as written, never
    interpreted (a message cannot break the output or drive the terminal)."""
    # rich doubles a trailing backslash (right only at the end of the markup): escape
    # with a space after it, then drop the space, so the value reads the same anywhere.
    return escape(escape_control(str(value)) + " ")[:-1]


def fail(error: Exception) -> typer.Exit:
    """Print `error` and return the exit (code 2) to raise."""
    console.print(f"[red]error:[/] {text(error)}", soft_wrap=True, highlight=False)
    return typer.Exit(2)
