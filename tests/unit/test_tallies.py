"""Garrison's own counters and histograms: what Prometheus scrapes is what
prometheus-client's own Counter and Histogram would have exposed for the same values,
a reader on another thread always sees a consistent histogram, and every app sharing
an OpenTelemetry meter is counted."""

from __future__ import annotations

import gc
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from garrison.engine import StepInfo
from garrison.observability._metrics import MetricsHooks, QueueDepth
from garrison.observability._tallies import Buckets, PrometheusView, Tally
from garrison.store import RunRecord, RunStatus
from tests.otel import metric_points

BOUNDS = (0.001, 0.01, 0.1, 1.0, 10.0)
LABELS = st.sampled_from(["a", "b", 'quo"te', "new\nline"])


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float | str]:
    """Every sample; a `_created` one by its presence (each library stamps its own)."""
    text = generate_latest(registry).decode()
    return {(s.name, repr(sorted(s.labels.items()))):
            "stamped" if s.name.endswith("_created") else s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(LABELS, st.floats(0, 50, allow_nan=False)), max_size=40))
def test_a_histogram_exposes_what_prometheus_client_would(
        values: list[tuple[str, float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = Buckets("h_seconds", "Doc.", ["step"], BOUNDS)
    ours.register(PrometheusView([], [buckets]))
    reference = Histogram("h_seconds", "Doc.", ["step"], registry=theirs, buckets=BOUNDS)
    for label, value in values:
        buckets.observe((label,), value)
        reference.labels(label).observe(value)

    assert _samples(ours) == pytest.approx(_samples(theirs))  # `_created` samples too


def _exemplars(registry: CollectorRegistry) -> dict[tuple[str, str], tuple[object, float]]:
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as parse_openmetrics,
    )
    text = openmetrics(registry).decode()
    return {(s.name, repr(sorted(s.labels.items()))): (s.exemplar.labels, s.exemplar.value)
            for family in parse_openmetrics(text) for s in family.samples
            if s.exemplar is not None}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(LABELS, st.floats(0, 50, allow_nan=False), st.booleans()),
                max_size=30))
def test_exemplars_are_the_latest_per_bucket_as_prometheus_client_keeps_them(
        values: list[tuple[str, float, bool]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = Buckets("h_seconds", "Doc.", ["step"], BOUNDS)
    ours.register(PrometheusView([], [buckets]))
    reference = Histogram("h_seconds", "Doc.", ["step"], registry=theirs, buckets=BOUNDS)
    for i, (label, value, marked) in enumerate(values):
        mark = {"trace_id": f"{i:032x}"} if marked else None
        buckets.observe((label,), value, mark)
        reference.labels(label).observe(value, exemplar=mark)

    assert _exemplars(ours) == _exemplars(theirs)


def test_merged_histograms_keep_each_buckets_latest_exemplar(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(1_000, 2_000))  # a clock that always moves on
    monkeypatch.setattr("garrison.observability._tallies.time.time", lambda: next(ticks))
    first = Buckets("h_seconds", "Doc.", ["step"], BOUNDS)
    second = Buckets("h_seconds", "Doc.", ["step"], BOUNDS)
    first.observe(("a",), 0.05, {"trace_id": "1" * 32})
    second.observe(("a",), 0.06, {"trace_id": "2" * 32})  # later, same bucket
    second.observe(("a",), 5.0, {"trace_id": "3" * 32})
    first.observe(("a",), 6.0, {"trace_id": "4" * 32})  # later than second's 5.0
    first.observe(("b",), 0.0001)  # no exemplar
    registry = CollectorRegistry()
    registry.register(PrometheusView([], [first.merged([first, second])]))

    marks = {key: labels["trace_id"][0] for key, (labels, _) in  # type: ignore[index]
             _exemplars(registry).items()}
    assert marks == {("h_seconds_bucket", "[('le', '0.1'), ('step', 'a')]"): "2",
                     ("h_seconds_bucket", "[('le', '10.0'), ('step', 'a')]"): "4"}
    assert text_string_to_metric_families(generate_latest(registry).decode())  # 0.0.4 too


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(LABELS, LABELS, st.integers(1, 5)), max_size=40))
def test_a_counter_exposes_what_prometheus_client_would(
        values: list[tuple[str, str, int]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = Tally("runs_finished", "Doc.", ["workflow", "status"])
    bare, bare_reference = Tally("lease_lost", "Doc."), Counter("lease_lost", "Doc.",
                                                               registry=theirs)
    ours.register(PrometheusView([tally, bare], []))
    reference = Counter("runs_finished", "Doc.", ["workflow", "status"], registry=theirs)
    for workflow, status, amount in values:
        tally.add((workflow, status), amount)
        reference.labels(workflow, status).inc(amount)
    if values:
        bare.add((), 2)
        bare_reference.inc(2)

    assert _samples(ours) == _samples(theirs)  # the bare counter too, at 0 before any add


def test_counters_carry_their_creation_time() -> None:
    registry = CollectorRegistry()
    tally = Tally("runs_started", "Doc.", ["workflow"])
    registry.register(PrometheusView([tally], []))
    tally.add(("w",))
    text = generate_latest(registry).decode()
    [created] = [s for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "runs_started_created"]
    assert created.labels == {"workflow": "w"} and created.value > 1.7e9


def test_bucket_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="must increase"):
        Buckets("h", "Doc.", [], (1.0, 0.5))


def test_created_series_follow_prometheus_clients_switch() -> None:
    registry = CollectorRegistry()
    tally, buckets = Tally("c", "Doc.", ["x"]), Buckets("h", "Doc.", ["x"], BOUNDS)
    registry.register(PrometheusView([tally], [buckets]))
    tally.add(("a",))
    buckets.observe(("a",), 0.5)
    assert {"c_created", "h_created"} <= {name for name, _ in _samples(registry)}
    disable_created_metrics()
    try:
        assert not [name for name, _ in _samples(registry) if name.endswith("_created")]
    finally:
        enable_created_metrics()


def test_a_snapshot_taken_while_values_arrive_is_consistent() -> None:
    buckets = Buckets("h", "Doc.", ["step"], BOUNDS)
    stop = threading.Event()
    seen: list[list[float]] = []

    def read() -> None:
        while not stop.is_set():
            seen.extend(row for _, row in buckets.snapshot())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(200_000):
            buckets.observe(("s",), 0.5)  # exact in binary: the sum is count x 0.5
    finally:
        stop.set()
        reader.join()
    assert seen, "the reader never ran"
    for row in seen:
        assert row[-1] == row[-2] * 0.5  # the sum agrees with the count (+Inf bucket)
    assert buckets.snapshot()[0][1][-2:] == [200_000, 100_000]


def _run(run_id: str, workflow: str) -> RunRecord:
    return RunRecord(run_id=run_id, workflow_name=workflow, workflow_version="1",
                     status=RunStatus.RUNNING, inputs="[]", created_at=1.0, updated_at=1.5,
                     started_at=1.5)


def test_every_app_sharing_a_meter_is_counted() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    hooks = [MetricsHooks(provider.get_meter("garrison", "1"), CollectorRegistry(),
                          QueueDepth(app=None), on_run=lambda: None) for _ in range(2)]
    for index, each in enumerate(hooks):
        for n in range(index + 1):  # one run in the first app, two in the second
            run = _run(f"r{index}-{n}", "w")
            each.run_started(run)
            step = StepInfo(run.run_id, "1", "s", 1, f"{run.run_id}:1")
            each.step_started(step)
            each.step_completed(step, 0.002)
            each.run_ended(run, RunStatus.COMPLETED)
    points = metric_points(reader)
    [started] = points["garrison.runs.started"]
    assert started.value == 3 and dict(started.attributes) == {
        "garrison.workflow.name": "w"}
    [finished] = points["garrison.runs.finished"]
    assert finished.value == 3
    [steps] = points["garrison.step.duration"]
    assert steps.count == 3  # both apps' queues were flushed
    [waits] = points["garrison.queue.wait_time"]
    assert waits.count == 3 and waits.sum == pytest.approx(1.5)
    provider.shutdown()


def test_events_reported_from_step_threads_are_all_counted() -> None:
    hooks = MetricsHooks(MeterProvider().get_meter("garrison"), CollectorRegistry(),
                         QueueDepth(app=None), on_run=lambda: None)
    per_thread = 50_000

    def report() -> None:
        for _ in range(per_thread):
            hooks.run_event("r", None, "garrison.model.fallback", {})

    threads = [threading.Thread(target=report) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert dict(hooks.events.snapshot()) == {("garrison.model.fallback",): 4 * per_thread}


def test_an_app_dropped_from_a_shared_meter_keeps_its_counts() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("garrison", "1")
    for index in range(2):
        hooks = MetricsHooks(meter, CollectorRegistry(), QueueDepth(app=None),
                             on_run=lambda: None)
        hooks.run_started(_run(f"r{index}", "w"))
        del hooks
    gc.collect()
    [started] = metric_points(reader)["garrison.runs.started"]
    assert started.value == 2  # a cumulative sum never drops
    provider.shutdown()


def test_a_timed_out_attempts_late_annotation_is_not_counted_on_the_next() -> None:
    registry = CollectorRegistry()
    hooks = MetricsHooks(MeterProvider().get_meter("garrison"), registry,
                         QueueDepth(app=None), on_run=lambda: None)
    run = _run("r", "w")
    hooks.run_started(run)
    first, second = (StepInfo("r", "1", "model", n, "r:1") for n in (1, 2))
    call = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "m"}
    hooks.step_started(first)
    hooks.step_failed(first, TimeoutError("timed out"), True)
    hooks.step_started(second)
    hooks.step_annotated(second, {**call, "gen_ai.usage.input_tokens": 7})
    hooks.step_annotated(first, {"gen_ai.usage.output_tokens": 500})  # attempt 1, too late
    hooks.step_completed(second, 0.01)
    labels = {"operation": "chat", "provider": "openai", "model": "m"}
    usage = "garrison_gen_ai_client_token_usage_sum"
    assert registry.get_sample_value(usage, {**labels, "token_type": "input"}) == 7
    assert registry.get_sample_value(usage, {**labels, "token_type": "output"}) is None
