"""A run's stored trace context: W3C `traceparent`, then optionally a space and a
`tracestate` (a traceparent never contains a space, so the split is unambiguous)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["context_text", "parent_context"]

_W3C = TraceContextTextMapPropagator()  # always W3C, whatever the global propagator is


def context_text(context: Context | None = None) -> str | None:
    """The current (or given) span context as stored text; None without a valid span."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    traceparent = carrier.get("traceparent")
    if not traceparent:
        return None
    tracestate = carrier.get("tracestate")
    return f"{traceparent} {tracestate}" if tracestate else traceparent


def parent_context(text: str | None) -> Context | None:
    """The stored context as a parent; None when absent or malformed (a new trace)."""
    if not text:
        return None
    traceparent, _, tracestate = text.strip().partition(" ")
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate.strip()
    context = _W3C.extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context
