"""The stored trace context is read like OpenTelemetry's W3C propagator reads it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from garrison.observability._propagation import context_text, parent_context, span_text

_W3C = TraceContextTextMapPropagator()
_HEX = "0123456789abcdef"


def _reference(text: str) -> SpanContext | None:
    traceparent, _, tracestate = text.strip().partition(" ")
    carrier = {"traceparent": traceparent}
    if tracestate.strip():
        carrier["tracestate"] = tracestate.strip()
    found = trace.get_current_span(_W3C.extract(carrier)).get_span_context()
    return found if found.is_valid else None


def _ours(text: str) -> SpanContext | None:
    context = parent_context(text)
    return None if context is None else trace.get_current_span(context).get_span_context()


def _hex(size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=_HEX, min_size=size, max_size=size)


# Mostly well-formed headers with one field bent, so both the valid and the refused
# paths are exercised.
_field = st.one_of(_hex(2), st.sampled_from(["00", "ff", "01", "0G", "0", "000"]))
_trace_id = st.one_of(_hex(32), st.just("0" * 32), _hex(31), st.just("A" * 32))
_span_id = st.one_of(_hex(16), st.just("0" * 16), _hex(17))
_rest = st.sampled_from(["", "-extra", "-", " "])
_state = st.sampled_from(["", "vendor=value", "a=1,b=2", "bad state", "=x"])


@given(_field, _trace_id, _span_id, _field, _rest, _state)
def test_parse_agrees_with_the_w3c_propagator(version: str, trace_id: str, span_id: str,
                                              flags: str, rest: str, state: str) -> None:
    text = f"{version}-{trace_id}-{span_id}-{flags}{rest}" + (f" {state}" if state else "")
    ours, reference = _ours(text), _reference(text)
    assert (ours is None) == (reference is None), text
    if ours is not None and reference is not None:
        assert (ours.trace_id, ours.span_id, ours.trace_flags, ours.is_remote) == (
            reference.trace_id, reference.span_id, reference.trace_flags,
            reference.is_remote)
        assert ours.trace_state.to_header() == reference.trace_state.to_header()


@given(st.text(max_size=80))
def test_any_text_is_a_context_or_none_never_an_error(text: str) -> None:
    assert (_ours(text) is None) == (_reference(text) is None), text


@given(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.sampled_from([0, 1]),
       st.sampled_from(["", "k=v", "a=1,b=2"]))
def test_written_text_reads_back_and_matches_the_propagator(
        trace_id: int, span_id: int, flags: int, state: str) -> None:
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags),
                          trace_state=TraceState.from_header([state]) if state else None)
    text = span_text(context)
    assert text is not None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(NonRecordingSpan(context)))
    assert text.split(" ")[0] == carrier["traceparent"]
    assert text == context_text(trace.set_span_in_context(NonRecordingSpan(context)))
    back = _ours(text)
    assert back is not None and (back.trace_id, back.span_id, int(back.trace_flags)) == (
        trace_id, span_id, flags)
    assert back.trace_state.to_header() == context.trace_state.to_header()


def test_no_valid_span_writes_nothing() -> None:
    assert context_text() is None
    assert span_text(trace.INVALID_SPAN_CONTEXT) is None
