"""A run's stored trace context: W3C `traceparent`, then optionally a space and a
`tracestate` (a traceparent never contains a space, so the split is unambiguous).

Read and written here directly rather than through a propagator's carrier: this runs
at every run start and resumption, and the format is fixed (always W3C, whatever the
global propagator is). The parse accepts what OpenTelemetry's W3C propagator accepts.
"""

from __future__ import annotations

import hashlib
import re

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

__all__ = ["context_text", "derived_context", "parent_context", "span_text"]

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


def derived_context(run_id: str) -> Context:
    """The parent of the segments of a run stored without a trace context (started by a
    process without `instrument`): a remote span context made from the run id, the same
    in every worker, so all of the run's segments are in one trace. No span has that id
    (the trace shows a missing root); it is flagged sampled, so a parent-based sampler
    records the run."""
    digest = hashlib.blake2b(run_id.encode(), digest_size=24,
                             person=b"garrison-trace").digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:], "big") or 1
    span_context = SpanContext(trace_id, span_id, is_remote=True,
                               trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())
