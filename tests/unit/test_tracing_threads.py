"""A synchronous step's thread and the event loop on one quiet step (step_spans="notable")."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
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
