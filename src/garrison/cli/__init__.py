"""The `garrison` command line (typer + rich)."""

from __future__ import annotations

from garrison.cli._main import app, main

__all__ = ["app", "main"]
