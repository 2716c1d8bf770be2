"""Step durations reach the OpenTelemetry histogram in bulk, none lost or counted twice."""

from __future__ import annotations

import threading

from opentelemetry.sdk.metrics import MeterProvider, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from garrison.engine import StepInfo
from garrison.observability._metrics import _FLUSH_AT, MetricsHooks, QueueDepth
from tests.otel import metric_points


def _hooks() -> tuple[MetricsHooks, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    # The default filter, whatever OTEL_METRICS_EXEMPLAR_FILTER says.
    meter = MeterProvider(metric_readers=[reader],
                          exemplar_filter=TraceBasedExemplarFilter()).get_meter("test")
    return MetricsHooks(meter, CollectorRegistry(), QueueDepth(app=None),
                        on_run=lambda: None), reader


def _count(reader: InMemoryMetricReader) -> int:
    return sum(point.count for point in metric_points(reader).get("garrison.step.duration", []))


def _steps(hooks: MetricsHooks, run: str, count: int) -> None:
    for i in range(count):
        step = StepInfo(run, str(i + 1), "s", 1, f"{run}:{i}")
        hooks.step_started(step)
        hooks.step_completed(step, 0.001)


def test_values_are_queued_until_collected_then_all_recorded() -> None:
    hooks, reader = _hooks()
    _steps(hooks, "r", 10)
    assert len(hooks._queued) == 10
    assert _count(reader) == 10 and not hooks._queued
    assert _count(reader) == 10  # cumulative: nothing recorded twice


def test_a_full_queue_is_recorded_without_waiting_for_a_collection() -> None:
    hooks, reader = _hooks()
    _steps(hooks, "r", _FLUSH_AT + 5)
    assert len(hooks._queued) == 5
    assert _count(reader) == _FLUSH_AT + 5


def test_collections_from_other_threads_lose_nothing() -> None:
    hooks, reader = _hooks()
    counts: list[int] = []
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set():
            counts.append(_count(reader))

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        for run in range(20):
            _steps(hooks, f"r{run}", 500)
    finally:
        stop.set()
        collector.join()
    assert _count(reader) == 20 * 500
    assert counts == sorted(counts)  # never counted back


def test_values_recorded_in_bulk_inside_a_span_carry_no_exemplar() -> None:
    # A full queue is recorded from whatever hook fills it, often with some run's span
    # current: the SDK would take that span as every queued value's exemplar, pointing
    # each one at an unrelated trace. Bulk-recorded values carry none (documented).
    hooks, reader = _hooks()
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("some run"):
        _steps(hooks, "r", _FLUSH_AT)
        assert not hooks._queued  # recorded here, under the span
        hooks._otel.duration.record(0.5, {"gen_ai.operation.name": "chat"})  # at once
    points = metric_points(reader)
    assert sum(point.count for point in points["garrison.step.duration"]) == _FLUSH_AT
    assert all(not point.exemplars for point in points["garrison.step.duration"])
    # the filter would have taken the span: a value recorded at once under it has one
    (call,) = points["gen_ai.client.operation.duration"]
    assert len(call.exemplars) == 1


def test_values_from_several_threads_while_collecting_are_each_recorded_once() -> None:
    hooks, reader = _hooks()
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set():
            _count(reader)

    def produce(thread: int) -> None:
        for i in range(3000):
            hooks._record_later(hooks._otel.step.record, 0.25,
                                {"garrison.step.name": f"s{thread}",
                                 "garrison.step.status": str(i % 3)})

    collector = threading.Thread(target=collect)
    producers = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    collector.start()
    try:
        for producer in producers:
            producer.start()
        for producer in producers:
            producer.join()
    finally:
        stop.set()
        collector.join()
    points = metric_points(reader)["garrison.step.duration"]
    assert len(points) == 12 and all(point.count == 1000 for point in points)
    assert sum(point.sum for point in points) == 12_000 * 0.25  # exact: quarters add up
