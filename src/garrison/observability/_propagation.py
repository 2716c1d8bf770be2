"""A run's stored trace context: W3C `traceparent`, then optionally a space and a
`tracestate` (a traceparent never contains a space, so the split is unambiguous).

Read and written here directly rather than through a propagator's carrier: this runs
at every run start and resumption, and the format is fixed (always W3C, whatever the
global propagator is). The parse accepts what OpenTelemetry's W3C propagator accepts.
"""

from __future__ import annotations

import re

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

__all__ = ["context_text", "parent_context", "span_text"]

# version-trace_id-parent_id-flags, lower-case hex; a later version may append fields.
_TRACEPARENT = re.compile(
    r"^\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*$")


def span_text(span_context: SpanContext) -> str | None:
    """`span_context` as stored text; None if it is not valid."""
    if not span_context.is_valid:
        return None
    text = (f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
            f"{int(span_context.trace_flags):02x}")
    state = span_context.trace_state
    return f"{text} {state.to_header()}" if state else text


def context_text(context: Context | None = None) -> str | None:
    """The current (or given) span context as stored text; None without a valid span."""
    return span_text(trace.get_current_span(context).get_span_context())


def parent_context(text: str | None) -> Context | None:
    """The stored context as a parent; None when absent or malformed (a new trace)."""
    if not text:
        return None
    traceparent, _, tracestate = text.strip().partition(" ")
    match = _TRACEPARENT.match(traceparent)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    span_context = SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=TraceState.from_header([tracestate.strip()]) if tracestate.strip()
        else None)
    if not span_context.is_valid:  # an all-zero trace or span id
        return None
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())
