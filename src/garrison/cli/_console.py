"""The CLI's terminal: one rich console, user values printed as text, errors as exit 2."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from garrison.observability import escape_control, mask_text

__all__ = ["console", "errors", "fail", "text"]

console = Console()
errors = Console(stderr=True)  # errors never mix with output a tool reads (--json)


def text(value: object) -> str:
    """A value from the store or the user (a run id, a name, an error message) for a
    rich markup string: its markup and control characters shown as written, never
    interpreted (a message cannot break the output or drive the terminal), and the
    secrets written in it masked as in logs (`mask_text`: an error naming its database
    URL prints `app:***@db`)."""
    # rich doubles a trailing backslash (right only at the end of the markup): escape
    # with a space after it, then drop the space, so the value reads the same anywhere.
    return escape(escape_control(mask_text(str(value))) + " ")[:-1]


def fail(error: Exception) -> typer.Exit:
    """Print `error` on stderr and return the exit (code 2) to raise."""
    errors.print(f"[red]error:[/] {text(error)}", soft_wrap=True, highlight=False)
    return typer.Exit(2)
