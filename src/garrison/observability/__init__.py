"""Observability: structured logs, OpenTelemetry traces and metrics, Prometheus.

Attached by composition. `configure_logging` needs nothing beyond structlog.
`instrument(app)` adds engine hooks (`garrison.engine.EngineHooks`) that emit spans and
metrics; it needs the `observability` extra (`pip install 'garrison[observability]'`),
imported only when `instrument` is first used. The engine never imports OpenTelemetry,
and nothing leaves the process unless the application configures an exporter or serves
the Prometheus registry (`garrison worker --metrics-port`). See docs/observability.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from garrison.observability._content import Redactor, no_redaction
from garrison.observability._logging import (
    MASK,
    SECRET_KEY_PARTS,
    ControlCharEscaper,
    add_record_extras,
    add_run_context,
    add_trace_context,
    configure_logging,
    escape_control,
    is_secret_key,
    mask_secrets,
    mask_text,
    mask_value,
)

if TYPE_CHECKING:
    from garrison.observability._instrument import Instrumentation, instrument

__all__ = [
    "ControlCharEscaper",
    "Instrumentation",
    "MASK",
    "Redactor",
    "SECRET_KEY_PARTS",
    "add_record_extras",
    "add_run_context",
    "add_trace_context",
    "configure_logging",
    "escape_control",
    "instrument",
    "is_secret_key",
    "mask_secrets",
    "mask_text",
    "mask_value",
    "no_redaction",
]


def __getattr__(name: str) -> Any:
    """`instrument` and `Instrumentation` import OpenTelemetry: only on first use."""
    if name in ("Instrumentation", "instrument"):
        from garrison.observability import _instrument

        return getattr(_instrument, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
