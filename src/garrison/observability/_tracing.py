"""Spans from engine hooks: one per run segment, one per live step, one per model call.

A run *segment* is one stretch of execution in one process: from the run's start or
resumption to its end, park or hand-back. Each segment's parent is the trace context
recorded with the run when it was started, so every segment of a run, in any worker and
after any number of crashes, is in the same trace; a resumed segment also links to that
context and says how many journal entries it replayed. Replayed steps get no span: their
work happened in an earlier segment, which has their spans.

Step spans (`instrument(step_spans=...)`): with "all" (the default) every live step
attempt has a span, current while its body runs, so spans the body makes (an HTTP
client's, the application's) are its children. With "notable" a step gets its span only
when it is worth reading: it describes itself (`annotate`: model and tool calls), fails,
is a retry, is interrupted, or takes at least `slow_step_s`; the span then starts at the
step's start (made when the step becomes notable, or when it ends) and spans its body
made before that point are children of the run segment instead. The segment span counts
the steps left without one (`garrison.run.steps_unspanned`). This spares the SDK's span
work (tens of microseconds) on every quick, successful step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

from garrison._log import get_logger
from garrison.engine import EngineHooks, StepInfo
from garrison.observability._content import CONTENT_ATTRIBUTES, Redactor, content_json
from garrison.observability._propagation import (
    context_text,
    derived_context,
    parent_context,
    span_text,
)
from garrison.store import RunRecord, RunStatus

__all__ = ["STEP_SPANS", "TracingHooks"]

STEP_SPANS = ("all", "notable")  # instrument(step_spans=...)

# GenAI operations that are calls to a model: their span is a CLIENT span of its own.
_CLIENT_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
_SPAN_NAME = "garrison.span.name"
# An agent used as another's tool runs as a child run started from workflow code, with
# no step: the agent loop reports the tool call around it (`record_event`), and the
# child's start is made under an `execute_tool` span of its own.
_TOOL_CALL, _TOOL_RESULT = "garrison.agent.tool_call", "garrison.agent.tool_result"
_ERROR_STATUSES = frozenset({RunStatus.FAILED, RunStatus.QUARANTINED})
_DROPPED = "garrison.content.dropped"  # content attributes left out, and why

_log = get_logger(__name__)


@dataclass(slots=True)
class _Segment:
    span: Span
    token: object
    # False when the tracer makes nothing (no SDK configured, a no-op provider): then
    # the segment's steps get no span either. A sampled-out segment is still traced:
    # its context is valid and its steps' spans carry it to outbound calls.
    traced: bool
    outcome: str = "released"  # until the run finishes or parks here
    status: str | None = None  # the run's final status, if it finished here
    unspanned: int = 0  # quick successful steps without a span ("notable")


@dataclass(slots=True)
class _StepSpans:
    span: Span | None  # None until the step is notable (step_spans="notable")
    token: object | None
    task: asyncio.Task[Any] | None
    started_ns: int = 0
    client: Span | None = None
    client_token: object | None = None
    # Taken by the loop to end the step: a synchronous step's thread, still running
    # (past its timeout), makes no span for it any more (it would never end).
    ended: bool = False
    attempt: int = 1  # a timed-out attempt's thread must not write on the next one's span


def _attribute(value: Any) -> Any:
    """A value OpenTelemetry takes as an attribute, or None."""
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        items = tuple(value)
        if all(isinstance(v, str) for v in items) or all(
                isinstance(v, bool | int | float) for v in items):
            return items
    return None


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # a synchronous step's thread
        return None


class TracingHooks(EngineHooks):
    """Engine hooks that emit OpenTelemetry spans (see the module docstring)."""

    def __init__(self, tracer: Tracer, *, worker_id: str, capture_content: bool,
                 redact: Redactor, step_spans: str = "all", slow_step_s: float = 0.1) -> None:
        if step_spans not in STEP_SPANS:
            raise ValueError(f"instrument(step_spans={step_spans!r}): one of "
                             f"{', '.join(map(repr, STEP_SPANS))}")
        if not slow_step_s >= 0:
            raise ValueError(f"instrument(slow_step_s={slow_step_s!r}): seconds, >= 0")
        self.tracer = tracer
        self.worker_id = worker_id
        self.capture_content = capture_content
        self.redact = redact
        self.every_step = step_spans == "all"
        self.slow_step_s = slow_step_s
        self._segments: dict[str, _Segment] = {}
        self._steps: dict[tuple[str, str], _StepSpans] = {}
        # step_spans="notable": live steps with no span yet -> (their task, start in ns);
        # a plain tuple, made at every step (~30 ns, where a _StepSpans takes ~120).
        self._quiet: dict[tuple[str, str], tuple[asyncio.Task[Any] | None, int]] = {}
        # A synchronous step annotates from its thread, possibly while the loop ends the
        # step (its timeout): a step's record moves from _quiet to _steps, and gets its
        # span, under this lock, so the loop never finds it in neither place.
        self._lock = threading.Lock()
        self._step_names: dict[str, str] = {}  # step name -> span name
        # An agent's tool calls to other agents, per parent run: the call each of its
        # tasks is about to start a child run for (the event and the start come from
        # the same task, so calls made at once in several tasks are told apart), then
        # each call's `execute_tool` span and child run id by call id (until its result,
        # or the end of the segment).
        self._tool_calls: dict[str, dict[asyncio.Task[Any] | None, dict[str, Any]]] = {}
        self._tool_spans: dict[str, dict[str, tuple[Span, str]]] = {}
        # Ended calls whose child's segment is still live here, by child run id. A child
        # tells its parent it has ended before its segment ends (run_detached), so the
        # parent's result can come first: the call's span then ends with the child's
        # segment, and spans all the child's work.
        self._tool_waiting: dict[str, Span] = {}
        self._content_errors: set[type[BaseException]] = set()

    # -- runs ----------------------------------------------------------------------

    def trace_context(self, run: RunRecord) -> str | None:
        if run.parent_run_id is not None:  # ctx.start_child: the parent segment's span
            parent_id = run.parent_run_id
            calls = self._tool_calls.get(parent_id)
            call = calls.pop(_current_task(), None) if calls else None
            if call is None:
                return context_text()
            if not calls:
                del self._tool_calls[parent_id]
            # an agent used as a tool: its run is a child of the call's span
            span = self.tracer.start_span(
                f"execute_tool {call.get('gen_ai.tool.name', '')}".strip(),
                attributes={**call, "gen_ai.operation.name": "execute_tool",
                            "gen_ai.tool.type": "agent"})
            call_id = str(call.get("gen_ai.tool.call.id", ""))
            self._end_tool(parent_id, call_id)  # a call id seen again: the left one ends
            self._tool_spans.setdefault(parent_id, {})[call_id] = (span, run.run_id)
            return span_text(span.get_span_context())
        # app.start: a short span marks the enqueue (under the caller's span, if any);
        # every segment of the run is its child.
        span = self.tracer.start_span(
            f"start_workflow {run.workflow_name}", kind=SpanKind.PRODUCER,
            attributes={"garrison.run_id": run.run_id,
                        "garrison.workflow.name": run.workflow_name,
                        "garrison.workflow.version": run.workflow_version,
                        "garrison.queue": run.queue})
        span.end()
        return span_text(span.get_span_context())

    def run_started(self, run: RunRecord) -> None:
        self._begin(run, None)

    def run_resumed(self, run: RunRecord, replayed_entries: int) -> None:
        self._begin(run, replayed_entries)

    def _begin(self, run: RunRecord, replayed: int | None) -> None:
        parent = parent_context(run.trace_context)
        attributes: dict[str, Any] = {
            "garrison.run_id": run.run_id, "garrison.workflow.name": run.workflow_name,
            "garrison.workflow.version": run.workflow_version,
            "garrison.worker": self.worker_id, "garrison.queue": run.queue,
            "garrison.run.fence": run.fence, "garrison.run.resumed": replayed is not None,
        }
        if run.parent_run_id is not None:
            attributes["garrison.run.parent_id"] = run.parent_run_id
        name = f"invoke_workflow {run.workflow_name}"
        if run.workflow_name.startswith("agent:"):
            agent = run.workflow_name.removeprefix("agent:")
            name = f"invoke_agent {agent}"
            attributes["gen_ai.operation.name"] = "invoke_agent"
            attributes["gen_ai.agent.name"] = agent
        links: list[Link] = []
        derived = parent is None and run.trace_context is None
        if derived:  # started untraced: a parent made from the run id, one per run
            parent = derived_context(run.run_id)
        if run.claim_reason is not None:
            attributes["garrison.run.claim_reason"] = run.claim_reason.value
        if replayed is not None:
            attributes["garrison.run.replayed_entries"] = replayed
            if parent is not None and not derived:  # no link to a span never made
                links.append(Link(trace.get_current_span(parent).get_span_context(),
                                  {"garrison.link": "run_started_from"}))
        # An explicit context, never the caller's: a malformed or missing stored context
        # starts a new trace rather than joining whatever task happens to be current.
        span = self.tracer.start_span(name, context=parent or otel_context.Context(),
                                      kind=SpanKind.INTERNAL, attributes=attributes,
                                      links=links)
        # A tracer that makes nothing passes its parent on (an SDK's span, even one
        # sampled out, has an id of its own): then no step asks it for a span either.
        passed_on = parent is not None and span.get_span_context() == (
            trace.get_current_span(parent).get_span_context())
        if derived and passed_on:
            # The derived context would reach outbound calls as a trace nobody records.
            # Untraced, as before.
            span = self.tracer.start_span(name, context=otel_context.Context())
        if replayed is not None:
            span.add_event("garrison.run.resumed", {"garrison.run.replayed_entries": replayed})
            reason = run.claim_reason
            if reason is not None and reason.is_recovery:
                recovered = {"garrison.run.claim_reason": reason.value}
                if run.previous_owner is not None:
                    recovered["garrison.run.previous_worker"] = run.previous_owner
                span.add_event("garrison.run.recovered", recovered)
        token = otel_context.attach(trace.set_span_in_context(span))
        self._segments[run.run_id] = _Segment(
            span, token, span.get_span_context().is_valid and not passed_on)

    def run_parked(self, run_id: str, wake_at: float | None) -> None:
        segment = self._segments.get(run_id)
        if segment is not None:
            segment.outcome = "parked"
            segment.span.add_event("garrison.run.parked", {} if wake_at is None
                                   else {"garrison.run.wake_at": wake_at})

    def run_finished(self, run_id: str, status: RunStatus) -> None:
        segment = self._segments.get(run_id)
        if segment is None:  # ended without executing here (a cancel of a queued run)
            return
        segment.outcome = status.value.lower()
        segment.status = status.value  # set with the others when the segment ends
        if status in _ERROR_STATUSES:
            segment.span.set_status(Status(StatusCode.ERROR, f"run {status.value}"))

    def run_ended(self, run: RunRecord, status: RunStatus) -> None:
        if run.run_id in self._segments:  # ended while executing here: its segment says it
            return
        # Ended without executing here (cancelled while queued or parked): its trace
        # still shows the end, as a segment of no length under its stored context.
        parent = parent_context(run.trace_context)
        if parent is None and run.trace_context is None:  # as its segments were
            parent = derived_context(run.run_id)
        if parent is None:
            return  # a stored context that cannot be read: nothing to continue
        name = (f"invoke_agent {run.workflow_name.removeprefix('agent:')}"
                if run.workflow_name.startswith("agent:")
                else f"invoke_workflow {run.workflow_name}")
        span = self.tracer.start_span(name, context=parent, attributes={
            "garrison.run_id": run.run_id, "garrison.workflow.name": run.workflow_name,
            "garrison.worker": self.worker_id, "garrison.run.status": status.value,
            "garrison.run.outcome": status.value.lower()})
        if status in _ERROR_STATUSES:
            span.set_status(Status(StatusCode.ERROR, f"run {status.value}"))
        span.end()

    def lease_lost(self, run_id: str) -> None:
        segment = self._segments.get(run_id)
        if segment is not None:
            segment.outcome = "lease_lost"
            segment.span.add_event("garrison.run.lease_lost")

    def _end_tool(self, run_id: str, call_id: str, error_type: str | None = None) -> None:
        spans = self._tool_spans.get(run_id)
        call = spans.pop(call_id, None) if spans else None
        if call is None:
            return
        if not spans:
            del self._tool_spans[run_id]
        span, child_id = call
        if error_type is not None:
            span.set_status(Status(StatusCode.ERROR, error_type))
            span.set_attribute("error.type", error_type)
        self._end_call(span, child_id)

    def _end_call(self, span: Span, child_id: str) -> None:
        if child_id in self._segments:
            self._tool_waiting[child_id] = span  # the child's run_detached ends it
        else:
            span.end()

    def run_detached(self, run_id: str) -> None:
        self._tool_calls.pop(run_id, None)
        # the run parks waiting for its children: their calls' spans end here (or with
        # the child's segment, if that is still live here)
        for span, child_id in self._tool_spans.pop(run_id, {}).values():
            self._end_call(span, child_id)
        segment = self._segments.pop(run_id, None)
        if segment is None:
            return
        attributes: dict[str, str | int] = {"garrison.run.outcome": segment.outcome}
        if segment.status is not None:
            attributes["garrison.run.status"] = segment.status
        if not self.every_step:
            attributes["garrison.run.steps_unspanned"] = segment.unspanned
        segment.span.set_attributes(attributes)  # one call: the SDK locks once per call
        segment.span.end()
        otel_context.detach(segment.token)  # type: ignore[arg-type]  # attach()'s token
        call = self._tool_waiting.pop(run_id, None)
        if call is not None:  # its call's result came before its segment ended
            call.end()

    # -- steps ---------------------------------------------------------------------

    def step_started(self, step: StepInfo) -> None:
        segment = self._segments.get(step.run_id)
        if segment is None or not segment.traced:
            # No segment: the run began executing before `instrument` (its steps would
            # be parented to whatever span launched it); none before its next segment.
            return
        if not self.every_step and step.attempt == 1:  # its span comes if it is notable
            self._quiet[(step.run_id, step.position)] = (_current_task(), time.time_ns())
            return
        span = self._step_span(step, None)
        token = otel_context.attach(trace.set_span_in_context(span))
        self._steps[(step.run_id, step.position)] = _StepSpans(
            span, token, _current_task(), attempt=step.attempt)

    def _step_span(self, step: StepInfo, started_ns: int | None) -> Span:
        # The run id is on the segment span (the parent); fewer attributes, cheaper spans.
        name = self._step_names.get(step.step_name)
        if name is None:
            name = self._step_names[step.step_name] = f"step {step.step_name}"
        attributes: dict[str, str | int] = {"garrison.step.position": step.position,
                                           "garrison.step.attempt": step.attempt}
        if started_ns is None:
            return self.tracer.start_span(name, attributes=attributes)
        segment = self._segments.get(step.run_id)
        context = (trace.set_span_in_context(segment.span) if segment is not None
                   else otel_context.Context())
        return self.tracer.start_span(name, context=context, attributes=attributes,
                                      start_time=started_ns)

    def _live(self, step: StepInfo, *, keep: bool) -> _StepSpans | None:
        """The live step's record (made from its quiet entry if it has no span yet),
        kept for later events or taken because the step ends now."""
        segment = self._segments.get(step.run_id)
        if segment is not None and not segment.traced:
            return None  # nothing was kept for the step (step_started)
        key = (step.run_id, step.position)
        with self._lock:
            spans = self._steps.get(key) if keep else self._steps.pop(key, None)
            if spans is None:
                quiet = self._quiet.pop(key, None)
                if quiet is None:
                    return None
                spans = _StepSpans(None, None, *quiet)
                if keep:
                    self._steps[key] = spans
            if spans.attempt != step.attempt:  # a late thread of an earlier attempt
                if not keep:
                    self._steps[key] = spans  # (never: the loop ends the live attempt)
                return None
            if not keep:
                spans.ended = True
            return spans

    def _notable(self, step: StepInfo, spans: _StepSpans, *, current: bool) -> Span:
        """The step's span, made now (from the step's start) if it has none yet; made
        current when asked and called from the step's own task."""
        span = spans.span
        if span is None:
            with self._lock:  # one span, if the step's thread and the loop both get here
                span = spans.span
                made = span is None and not (spans.ended and current)
                if made:
                    span = spans.span = self._step_span(step, spans.started_ns)
                elif span is None:  # a late thread of an ended step: nothing to add to
                    return trace.INVALID_SPAN
            if made and current and spans.task is not None and spans.task is _current_task():
                spans.token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def step_annotated(self, step: StepInfo, attributes: Mapping[str, Any]) -> None:
        spans = self._live(step, keep=True)
        if spans is None:
            return
        step_span = self._notable(step, spans, current=True)
        values: dict[str, Any] = {}
        for key, value in attributes.items():
            if key in CONTENT_ATTRIBUTES:
                if self.capture_content:
                    self._content(key, value, values)
            elif key != _SPAN_NAME:
                converted = _attribute(value)
                if converted is not None:
                    values[key] = converted
        hint = attributes.get(_SPAN_NAME)
        operation = attributes.get("gen_ai.operation.name")
        if spans.client is None and operation in _CLIENT_OPERATIONS:
            name = str(hint or f"{operation} {attributes.get('gen_ai.request.model', '')}")
            with self._lock:  # not once the loop has taken the step to end it
                if spans.ended or spans.client is not None:
                    return
                spans.client = self.tracer.start_span(
                    name.strip(), kind=SpanKind.CLIENT, attributes=values,
                    context=trace.set_span_in_context(step_span))
            if spans.task is not None and spans.task is _current_task():
                # the provider's HTTP request carries this span's traceparent
                spans.client_token = otel_context.attach(
                    trace.set_span_in_context(spans.client))
            return
        target = spans.client or step_span
        if hint and spans.client is None:
            target.update_name(str(hint))
        target.set_attributes(values)

    def _content(self, key: str, value: Any, values: dict[str, Any]) -> None:
        # Telemetry never fails the step: the model has answered (and been paid) by the
        # time its output is annotated.
        try:
            text = content_json(key, value, self.redact)
        except Exception as exc:
            dropped = values.get(_DROPPED, ())
            values[_DROPPED] = (*dropped, f"{key}: {type(exc).__qualname__}")
            if type(exc) not in self._content_errors:  # once per kind, not per call
                self._content_errors.add(type(exc))
                _log.warning("observability.content_dropped", attribute=key,
                             error=f"{type(exc).__qualname__}: {exc}",
                             fix="make redact= (or the annotated value) handle this "
                                 "content; the attribute is left out until then")
            return
        if text is not None:
            values[key] = text

    def step_completed(self, step: StepInfo, duration_s: float) -> None:
        segment = self._segments.get(step.run_id)
        if segment is not None and not segment.traced:
            return  # nothing was kept for the step (step_started)
        if (duration_s < self.slow_step_s
                and self._quiet.pop((step.run_id, step.position), None) is not None):
            if segment is not None:
                segment.unspanned += 1
            return
        spans = self._live(step, keep=False)
        if spans is None:
            return
        if spans.span is None:  # slow
            self._notable(step, spans, current=False)
        self._end(spans)

    def step_failed(self, step: StepInfo, error: BaseException, will_retry: bool) -> None:
        spans = self._live(step, keep=False)
        if spans is None:
            return
        step_span = self._notable(step, spans, current=False)
        error_type = type(error).__qualname__
        for span in (spans.client, step_span):
            if span is None:
                continue
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{error_type}: {error}"))
            span.set_attribute("error.type", error_type)
        step_span.set_attribute("garrison.step.will_retry", will_retry)
        breaker = getattr(error, "breaker", None)
        if breaker is not None:  # CircuitOpenError: refused without a call
            step_span.add_event("garrison.breaker.rejected",
                                 {"garrison.breaker.name": str(breaker),
                                  "garrison.breaker.state": str(getattr(error, "state", ""))})
        segment = self._segments.get(step.run_id)
        if will_retry and segment is not None:
            segment.span.add_event("garrison.step.retry_scheduled", {
                "garrison.step.name": step.step_name, "garrison.step.position": step.position,
                "garrison.step.attempt": step.attempt, "error.type": error_type})
        self._end(spans)

    def step_interrupted(self, step: StepInfo, error: BaseException) -> None:
        spans = self._live(step, keep=False)
        if spans is not None:
            self._notable(step, spans, current=False).add_event(
                "garrison.step.interrupted",
                {"garrison.reason": str(error) or type(error).__name__})
            self._end(spans)

    def run_event(self, run_id: str, step: StepInfo | None, name: str,
                  attributes: Mapping[str, Any]) -> None:
        values = {key: converted for key, value in attributes.items()
                  if (converted := _attribute(value)) is not None}
        if step is None and name == _TOOL_CALL:  # its span comes with the child's start
            self._tool_calls.setdefault(run_id, {})[_current_task()] = values
            return
        if step is None and name == _TOOL_RESULT:
            calls = self._tool_calls.get(run_id)
            if calls:  # the child never started (its start failed)
                calls.pop(_current_task(), None)
                if not calls:
                    del self._tool_calls[run_id]
            error_type = values.get("error.type")
            self._end_tool(run_id, str(values.get("gen_ai.tool.call.id", "")),
                           str(error_type) if error_type is not None else None)
            return
        if step is not None:
            spans = self._live(step, keep=True)
            if spans is not None:
                self._notable(step, spans, current=True).add_event(name, values)
                return
        segment = self._segments.get(run_id)
        if segment is not None:
            segment.span.add_event(name, values)

    def _end(self, spans: _StepSpans) -> None:
        if spans.client is not None:
            spans.client.end()
            _restore(spans.client_token, spans.client)
        if spans.span is not None:
            spans.span.end()
        _restore(spans.token, spans.span)


def _restore(token: object | None, span: Span | None) -> None:
    """Make current again what was before `span` was attached (with `token`), if `span`
    is still current. It is not when it was attached inside a span of the step's own
    (`with tracer.start_as_current_span(...)`, which annotated or reported an event)
    that has ended since: that span's exit already restored what was before both, and
    detaching would make the ended span current again in the workflow code."""
    if token is not None and trace.get_current_span() is span:
        otel_context.detach(token)  # type: ignore[arg-type]  # attach()'s token
