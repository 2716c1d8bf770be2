"""A synchronous step's thread and the event loop on one quiet step (step_spans="notable")."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from garrison.engine import StepInfo
from garrison.observability import _tracing
from garrison.observability._content import no_redaction
from garrison.store import RunRecord, RunStatus


def test_the_loop_ending_a_step_its_thread_is_annotating_still_gets_its_span(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The loop gives up on a synchronous step (its timeout) while the step's thread, still
    # running, annotates it: the thread moves the step's record out of the quiet steps;
    # the loop must find it, not neither place (no span, and a record left behind).
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hooks = _tracing.TracingHooks(provider.get_tracer("test"), worker_id="w",
                                  capture_content=False, redact=no_redaction,
                                  step_spans="notable")
    run = RunRecord(run_id="r", workflow_name="w", workflow_version="1",
                    status=RunStatus.RUNNING, inputs="[]", created_at=1.0, updated_at=1.0)
    hooks.run_started(run)
    step = StepInfo("r", "1", "sync", 1, "r:1")
    hooks.step_started(step)

    moving, go_on = threading.Event(), threading.Event()
    record = _tracing._StepSpans

    def slow_record(*args: Any) -> _tracing._StepSpans:
        moving.set()  # the thread is moving the record: hold it there
        go_on.wait(5)
        return record(*args)

    monkeypatch.setattr(_tracing, "_StepSpans", slow_record)
    thread = threading.Thread(target=hooks.step_annotated, args=(step, {"shop.n": 1}))
    thread.start()
    assert moving.wait(5)
    loop = threading.Thread(target=hooks.step_failed,
                            args=(step, TimeoutError("step timed out"), False))
    loop.start()
    loop.join(0.2)  # the loop's step_failed arrives while the record is on the move
    go_on.set()
    thread.join(5)
    loop.join(5)
    hooks.run_finished("r", RunStatus.FAILED)
    hooks.run_detached("r")

    (span,) = [s for s in exporter.get_finished_spans() if s.name == "step sync"]
    assert span.status.status_code is StatusCode.ERROR
    assert not hooks._steps and not hooks._quiet


class _Opened(SpanProcessor):
    """Span processor keeping the spans started and not ended."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.open[span.context.span_id] = span.name

    def on_end(self, span: Any) -> None:
        self.open.pop(span.context.span_id, None)


def _hooks(step_spans: str) -> tuple[_tracing.TracingHooks, InMemorySpanExporter, _Opened]:
    exporter = InMemorySpanExporter()
    opened = _Opened()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(opened)
    hooks = _tracing.TracingHooks(provider.get_tracer("test"), worker_id="w",
                                  capture_content=False, redact=no_redaction,
                                  step_spans=step_spans)
    hooks.run_started(RunRecord(run_id="r", workflow_name="w", workflow_version="1",
                                status=RunStatus.RUNNING, inputs="[]", created_at=1.0,
                                updated_at=1.0))
    return hooks, exporter, opened


@pytest.mark.parametrize("step_spans", ["all", "notable"])
def test_a_model_call_annotated_as_the_loop_ends_the_step_leaves_no_span_open(
        monkeypatch: pytest.MonkeyPatch, step_spans: str) -> None:
    hooks, exporter, opened = _hooks(step_spans)
    step = StepInfo("r", "1", "model_sync", 1, "r:1")
    hooks.step_started(step)
    reading, go_on = threading.Event(), threading.Event()
    convert = _tracing._attribute

    def slow_attribute(value: Any) -> Any:
        reading.set()  # the thread has the step's record, and is reading its attributes
        go_on.wait(5)
        return convert(value)

    monkeypatch.setattr(_tracing, "_attribute", slow_attribute)
    thread = threading.Thread(target=hooks.step_annotated, args=(step, {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}))
    thread.start()
    assert reading.wait(5)
    hooks.step_failed(step, TimeoutError("step timed out"), False)  # the loop gives up
    go_on.set()
    thread.join(5)
    hooks.run_finished("r", RunStatus.FAILED)
    hooks.run_detached("r")
    assert opened.open == {}
    assert not hooks._steps and not hooks._quiet
    assert "step model_sync" in [s.name for s in exporter.get_finished_spans()]


@pytest.mark.parametrize("step_spans", ["all", "notable"])
def test_a_timed_out_attempts_late_thread_does_not_write_on_the_next_attempt(
        step_spans: str) -> None:
    hooks, exporter, opened = _hooks(step_spans)
    first, second = (StepInfo("r", "1", "slow", n, "r:1") for n in (1, 2))
    hooks.step_started(first)
    hooks.step_failed(first, TimeoutError("timed out"), True)  # retried at once
    hooks.step_started(second)
    hooks.step_annotated(first, {"shop.written_by_attempt": 1})  # attempt 1's thread
    hooks.run_event("r", first, "shop.late_event", {"attempt": 1})
    hooks.step_annotated(second, {"shop.written_by_attempt": 2})
    hooks.step_completed(second, 0.01)
    hooks.run_finished("r", RunStatus.COMPLETED)
    hooks.run_detached("r")
    spans = {dict(s.attributes or {})["garrison.step.attempt"]: s
             for s in exporter.get_finished_spans() if s.name == "step slow"}
    assert dict(spans[2].attributes or {})["shop.written_by_attempt"] == 2
    assert [e.name for e in spans[2].events] == []
    assert "shop.written_by_attempt" not in dict(spans[1].attributes or {})
    assert opened.open == {}
