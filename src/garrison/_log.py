"""A structlog logger bound lazily: `import garrison` must not pay for structlog (and the
rich tracebacks it pulls in, ≈ 100 ms here) before the first line is logged.

Per-run events are logged at debug level, and debug events are dropped until the
application configures structlog: unconfigured structlog prints every level with its
console renderer (≈ 0.5 ms a line here), which would cost more than a durable step.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["get_logger"]


class _LazyLogger:
    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def _bound(self) -> Any:
        if self._logger is None:
            import structlog

            self._logger = structlog.get_logger(self._name)
        return self._logger

    def debug(self, event: str, **fields: Any) -> None:
        # Another thread may be importing structlog right now: a partly initialised
        # module has no `is_configured` yet (seen with the LLM server's thread).
        is_configured = getattr(sys.modules.get("structlog"), "is_configured", None)
        if is_configured is not None and is_configured():
            self._bound().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._bound().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._bound().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._bound().error(event, **fields)


def get_logger(name: str) -> _LazyLogger:
    """`structlog.get_logger(name)`, imported on first use."""
    return _LazyLogger(name)
