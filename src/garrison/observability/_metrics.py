"""Metrics from engine hooks, to an OpenTelemetry meter and a Prometheus registry.

Labels are low-cardinality only: workflow, step, status, queue, model, breaker, token
type. Never a run id: a run is found from its trace (or `garrison runs show`).

Counters and the Prometheus histograms are Garrison's own tallies (`_tallies`): a
dict update per event, read when the metrics are collected, Prometheus through a
collector and OpenTelemetry through observable counters. OpenTelemetry has no
observable histogram, so its histograms are recorded value by value; step durations
and queue waits, measured at every step and run, are queued (a deque append) and
recorded in one loop when the metrics are collected (an observable instrument's
callback runs before the collection reads the histograms) or once `_FLUSH_AT` values
wait. The values and their aggregation are the same. Such a measurement carries no
exemplar: it is recorded under an empty context (a full queue is flushed from inside
some run, whose span is no exemplar of the other values); model-call durations and
tokens are recorded at once and keep theirs.

Prometheus exemplars: a model call's duration and tokens, and a step attempt that did
not complete (failed, retried, interrupted), mark their bucket with the trace and span
current when the hook ran (the run segment's span) if that trace is sampled; the
OpenMetrics exposition shows the latest per bucket (`Accept:
application/openmetrics-text`), so a slow or failing bucket leads to a trace. Quick
successful steps carry none: looking the span up at every step costs more than it tells.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from garrison.engine import EngineHooks, StepInfo
from garrison.observability._tallies import Buckets, PrometheusView, Tally
from garrison.store import RunRecord, RunStatus

__all__ = ["BREAKER_STATES", "MetricsHooks", "QueueDepth"]

# `garrison_breaker_state` values.
BREAKER_STATES = {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2, "FORCED_OPEN": 3, "DISABLED": 4}
# The GenAI semantic conventions' bucket boundaries.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                  16777216, 67108864)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                     20.48, 40.96, 81.92)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0, 300.0)
_FLUSH_AT = 2048  # step durations queued for OpenTelemetry before they are recorded anyway


def _exemplar() -> dict[str, str] | None:
    """The current span as a Prometheus exemplar's labels, if its trace is recorded (an
    exemplar of a trace sampled out, or of no trace, would lead nowhere)."""
    context = trace.get_current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        return None
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class QueueDepth:
    """Runs waiting (PENDING) per queue, read from the store when metrics are collected.

    Collection happens on another thread (the Prometheus HTTP server, a periodic
    exporter): the count runs on the app's event loop and is awaited at most
    `timeout_s`. Collected on the loop's own thread, it reports nothing rather than
    block the loop.
    """

    def __init__(self, app: Any, timeout_s: float = 2.0, limit: int = 100_000) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.limit = limit
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def store_key(self) -> object:
        """What tells two apps' stores apart: apps on one database count its queues once."""
        store = getattr(self.app, "store", None)
        return getattr(store, "url", None) or id(self)

    def bind_loop(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()

    def read(self) -> dict[str, int] | None:
        loop = getattr(self.app, "loop", None) or self.loop  # open, if nothing ran yet
        if loop is None or loop.is_closed() or not loop.is_running():
            return None
        if getattr(loop, "_thread_id", None) == threading.get_ident():
            return None
        future = asyncio.run_coroutine_threadsafe(
            self.app.store.list_runs(statuses=[RunStatus.PENDING], limit=self.limit), loop)
        try:
            runs = future.result(timeout=self.timeout_s)
        except Exception:  # the store is down or slow: no sample this time
            future.cancel()
            return None
        depth = {name: 0 for name in self.app.queues}
        depth.update(Counter(run.queue for run in runs))
        return depth


def _total_depth(hooks: Iterable[MetricsHooks]) -> dict[str, int]:
    """Runs waiting per queue over the stores of `hooks` (apps sharing a store see the
    same queues: each store is counted once)."""
    depth: dict[str, int] = {}
    stores: set[object] = set()
    for each in hooks:
        if each.depth.store_key in stores:
            continue
        stores.add(each.depth.store_key)
        for queue, count in (each.depth.read() or {}).items():
            depth[queue] = depth.get(queue, 0) + count
    return depth


class _Members:
    """The `MetricsHooks` sharing one exporter-side object (a meter, a registry)."""

    def __init__(self) -> None:
        # Held for the object's life: an app's counts must not leave a cumulative sum
        # (a backend would read a reset), nor its queue.
        self._hooks: list[MetricsHooks] = []
        self._lock = threading.Lock()  # apps join on their threads; collections read

    def join(self, hooks: MetricsHooks) -> None:
        with self._lock:
            self._hooks.append(hooks)

    def members(self) -> list[MetricsHooks]:
        with self._lock:
            return list(self._hooks)


class _RegistryView(_Members, Collector):
    """Garrison's Prometheus metrics on one registry, summed over every `MetricsHooks`
    using it (a registry refuses a second collector of the same names): counters and
    histograms from the hooks' tallies, queue depth from their stores, and the breaker
    gauge they all set."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        # The registry is not kept here: `_REGISTRIES` holds this view by it, weakly.
        self.breaker = Gauge("garrison_breaker_state", "Circuit breaker state: 0 closed, "
                             "1 half-open, 2 open, 3 forced open, 4 disabled.", ["breaker"],
                             registry=registry)
        self._registered = False

    def join_on(self, registry: CollectorRegistry, hooks: MetricsHooks) -> None:
        self.join(hooks)
        with self._lock:  # registered with its first member: describe() names its metrics
            if self._registered:
                return
            self._registered = True
        registry.register(self)

    def _view(self) -> PrometheusView | None:
        members = self.members()
        if not members:
            return None
        first = members[0]
        return PrometheusView(
            [getattr(first, c.attr).merged(getattr(h, c.attr) for h in members)
             for c in _COUNTERS],
            [getattr(first, attr).merged(getattr(h, attr) for h in members)
             for attr in _HISTOGRAMS])

    def describe(self) -> Iterable[Metric]:
        view = self._view()
        if view is not None:
            yield from view.describe()
        yield GaugeMetricFamily("garrison_queue_depth", _DEPTH_DOC, labels=["queue"])

    def collect(self) -> Iterable[Metric]:
        view = self._view()
        if view is not None:
            yield from view.collect()
        family = GaugeMetricFamily("garrison_queue_depth", _DEPTH_DOC, labels=["queue"])
        for queue, count in sorted(_total_depth(self.members()).items()):
            family.add_metric([queue], count)
        yield family


_DEPTH_DOC = "Runs waiting in each queue (PENDING), read from the store at scrape time."
# The MetricsHooks attributes holding Prometheus histograms (`Buckets`).
_HISTOGRAMS = ("step_durations", "queue_waits", "token_usage", "call_durations")


@dataclass(frozen=True, slots=True)
class _Counter:
    """One counter, as Prometheus and OpenTelemetry name it."""

    attr: str  # the MetricsHooks attribute holding its Tally
    name: str  # Prometheus (exposed with _total)
    doc: str
    labels: tuple[str, ...]
    otel_name: str
    otel_unit: str
    otel_doc: str
    otel_attributes: tuple[str, ...]  # one per label, in order


_COUNTERS = (
    _Counter("started", "garrison_runs_started", "Runs started.", ("workflow",),
             "garrison.runs.started", "{run}", "Runs started", ("garrison.workflow.name",)),
    _Counter("finished", "garrison_runs_finished", "Runs ended, by status.",
             ("workflow", "status"), "garrison.runs.finished", "{run}",
             "Runs ended, by status", ("garrison.workflow.name", "garrison.run.status")),
    _Counter("resumed", "garrison_runs_resumed",
             "Run segments resumed from a journal (recoveries, wake-ups).", ("workflow",),
             "garrison.runs.resumed", "{run}",
             "Run segments resumed from a journal (recoveries, wake-ups)",
             ("garrison.workflow.name",)),
    _Counter("recovered", "garrison_runs_recovered",
             "Runs taken over after their segment ended without parking or finishing, "
             "by claim reason (abandoned: the owner's lease ran out; handed_back; retry).",
             ("workflow", "reason"), "garrison.runs.recovered", "{run}",
             "Runs taken over after their segment ended without parking or finishing",
             ("garrison.workflow.name", "garrison.run.claim_reason")),
    _Counter("retries", "garrison_step_retries", "Step retries scheduled.", ("step",),
             "garrison.step.retries", "{retry}", "Step retries scheduled",
             ("garrison.step.name",)),
    _Counter("leases", "garrison_lease_lost", "Runs taken over by another worker.", (),
             "garrison.lease.lost", "{run}",
             "Runs taken over by another worker (this worker's lease ran out)", ()),
    _Counter("cost", "garrison_gen_ai_cost_usd", "Model call cost in USD.",
             ("provider", "model"), "garrison.gen_ai.cost", "USD", "Model call cost",
             ("gen_ai.provider.name", "gen_ai.request.model")),
    _Counter("events", "garrison_events",
             "Garrison's own run events (model fallbacks, supervisor restarts), by name.",
             ("event",), "garrison.events", "{event}",
             "Garrison's own run events (model fallbacks, supervisor restarts)",
             ("garrison.event.name",)),
)


class _MeterView(_Members):
    """The OpenTelemetry instruments on one meter, shared by every `MetricsHooks` using
    that meter: the SDK hands a second instrument of the same name back as the first,
    so a second app's callbacks would never run. Counters are observable instruments
    reading the hooks' tallies at collection; histograms are recorded (step durations
    and queue waits in bulk, from each hooks' queue, before a collection reads them)."""

    def __init__(self, meter: Meter) -> None:
        super().__init__()  # members held for the meter's life, as it holds a callback
        # In seconds, with the Prometheus twins' buckets (the SDK's default ones are ms).
        self.step = meter.create_histogram(
            "garrison.step.duration", unit="s", description="Live step attempts",
            explicit_bucket_boundaries_advisory=list(_STEP_BUCKETS))
        self.wait = meter.create_histogram(
            "garrison.queue.wait_time", unit="s",
            description="Time from a run's creation to its first start",
            explicit_bucket_boundaries_advisory=list(_STEP_BUCKETS))
        self.breaker = meter.create_gauge(
            "garrison.breaker.state", description="0 closed, 1 half-open, 2 open, "
            "3 forced open, 4 disabled")
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used by model calls",
            explicit_bucket_boundaries_advisory=list(_TOKEN_BUCKETS))
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Model call duration",
            explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS))
        for counter in _COUNTERS:
            meter.create_observable_counter(
                counter.otel_name, [self._observer(counter)], unit=counter.otel_unit,
                description=counter.otel_doc)
        meter.create_observable_gauge("garrison.queue.depth", [self._observe_depth],
                                      unit="{run}", description="Runs waiting per queue")

    def _observer(self, counter: _Counter) -> Callable[[CallbackOptions],
                                                       Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            totals: dict[tuple[str, ...], float] = {}
            for hooks in self.members():
                for key, value in getattr(hooks, counter.attr).snapshot():
                    totals[key] = totals.get(key, 0) + value
            return [Observation(value, dict(zip(counter.otel_attributes, key, strict=True)))
                    for key, value in totals.items()]
        return observe

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        hooks = self.members()
        for each in hooks:  # the collection reads the histograms after the callbacks
            each.flush()
        return [Observation(count, {"garrison.queue": queue})
                for queue, count in _total_depth(hooks).items()]


# One view per meter and per registry, held weakly by it (a view never refers to it).
_VIEWS: weakref.WeakKeyDictionary[Meter, _MeterView] = weakref.WeakKeyDictionary()
_REGISTRIES: weakref.WeakKeyDictionary[CollectorRegistry, _RegistryView] = (
    weakref.WeakKeyDictionary())
_VIEWS_LOCK = threading.Lock()
K = TypeVar("K")
V = TypeVar("V")


def _view_for(views: weakref.WeakKeyDictionary[K, V], key: K, make: Callable[[K], V]) -> V:
    with _VIEWS_LOCK:
        view = views.get(key)
        if view is None:
            view = views[key] = make(key)
        return view


def _meter_view(meter: Meter) -> _MeterView:
    return _view_for(_VIEWS, meter, _MeterView)


def _registry_view(registry: CollectorRegistry) -> _RegistryView:
    return _view_for(_REGISTRIES, registry, _RegistryView)


class MetricsHooks(EngineHooks):
    """Engine hooks that count runs, time steps and model calls (see the module docs)."""

    def __init__(self, meter: Meter, registry: CollectorRegistry, depth: QueueDepth,
                 on_run: Callable[[], None]) -> None:
        self.depth = depth
        self._on_run = on_run
        # live step -> (perf_counter at its start, its attempt)
        self._steps: dict[tuple[str, str], tuple[float, int]] = {}
        self._annotations: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._step_attributes: dict[tuple[str, str], dict[str, str]] = {}
        self._queue_attributes: dict[str, dict[str, str]] = {}
        # OpenTelemetry histograms recorded in bulk: (record, value, attributes)
        self._queued: deque[tuple[Callable[[float, dict[str, str]], None], float,
                                  dict[str, str]]] = deque()
        self._otel = _meter_view(meter)
        self._otel.join(self)
        for counter in _COUNTERS:
            setattr(self, counter.attr, Tally(counter.name, counter.doc, counter.labels))
        self.step_durations = Buckets("garrison_step_duration_seconds", "Live step attempts.",
                                      ["step", "status"], _STEP_BUCKETS)
        self.queue_waits = Buckets("garrison_queue_wait_seconds", "Time from a run's "
                                   "creation to its first start.", ["queue"], _STEP_BUCKETS)
        self.token_usage = Buckets("garrison_gen_ai_client_token_usage",
                                   "Tokens used by model calls.",
                                   ["operation", "provider", "model", "token_type"],
                                   _TOKEN_BUCKETS)
        self.call_durations = Buckets("garrison_gen_ai_client_operation_duration_seconds",
                                      "Model call duration.",
                                      ["operation", "provider", "model", "error_type"],
                                      _DURATION_BUCKETS)
        self._prometheus = _registry_view(registry)  # shared by the apps using registry
        self._prometheus.join_on(registry, self)

    started: Tally
    finished: Tally
    resumed: Tally
    recovered: Tally
    retries: Tally
    leases: Tally
    cost: Tally
    events: Tally

    def flush(self) -> None:
        """Record the queued step durations and queue waits into the OpenTelemetry
        histograms (safe from any thread: each value is taken off the queue once)."""
        queued = self._queued
        if not queued:
            return
        # Under an empty context: a full queue is flushed from whatever hook filled it,
        # often with a run's span current, which the SDK would take as the exemplar of
        # every value (each pointing at an unrelated trace).
        token = otel_context.attach(otel_context.Context())
        try:
            while True:
                try:
                    record, value, attributes = queued.popleft()
                except IndexError:
                    return
                record(value, attributes)
        finally:
            otel_context.detach(token)

    def _record_later(self, record: Callable[[float, dict[str, str]], None], value: float,
                      attributes: dict[str, str]) -> None:
        self._queued.append((record, value, attributes))
        if len(self._queued) >= _FLUSH_AT:
            self.flush()

    # -- runs ----------------------------------------------------------------------

    def run_started(self, run: RunRecord) -> None:
        self._on_run()
        self.started.add((run.workflow_name,))
        wait = max(0.0, (run.started_at or run.created_at) - run.created_at)
        attributes = self._queue_attributes.get(run.queue)
        if attributes is None:
            attributes = self._queue_attributes[run.queue] = {"garrison.queue": run.queue}
        self._record_later(self._otel.wait.record, wait, attributes)
        self.queue_waits.observe((run.queue,), wait)

    def run_resumed(self, run: RunRecord, replayed_entries: int) -> None:
        self._on_run()
        self.resumed.add((run.workflow_name,))
        reason = run.claim_reason
        if reason is not None and reason.is_recovery:
            self.recovered.add((run.workflow_name, reason.value))

    def run_ended(self, run: RunRecord, status: RunStatus) -> None:
        # With the record: a run cancelled while queued or parked has its workflow too.
        self.finished.add((run.workflow_name, status.value))

    def run_event(self, run_id: str, step: StepInfo | None, name: str,
                  attributes: Mapping[str, Any]) -> None:
        if name.startswith("garrison."):  # the application's own names may be unbounded
            with self._lock:  # reported from a synchronous step's thread too
                self.events.add((name,))

    def lease_lost(self, run_id: str) -> None:
        self.leases.add(())

    def breaker_changed(self, name: str, state: str) -> None:
        value = BREAKER_STATES.get(state, -1)
        self._otel.breaker.set(value, {"garrison.breaker.name": name})
        self._prometheus.breaker.labels(name).set(value)

    # -- steps ---------------------------------------------------------------------

    def step_started(self, step: StepInfo) -> None:
        self._steps[(step.run_id, step.position)] = (time.perf_counter(), step.attempt)

    def step_annotated(self, step: StepInfo, attributes: Mapping[str, Any]) -> None:
        key = (step.run_id, step.position)
        live = self._steps.get(key)
        if live is None or live[1] != step.attempt:  # (a timed-out attempt's late thread)
            return
        with self._lock:  # a synchronous step annotates from its thread
            self._annotations.setdefault(key, {}).update(attributes)

    def step_completed(self, step: StepInfo, duration_s: float) -> None:
        self._step_ended(step, "completed", duration_s, None)

    def step_failed(self, step: StepInfo, error: BaseException, will_retry: bool) -> None:
        if will_retry:
            self.retries.add((step.step_name,))
        self._step_ended(step, "retried" if will_retry else "failed", None,
                         type(error).__qualname__)

    def step_interrupted(self, step: StepInfo, error: BaseException) -> None:
        self._step_ended(step, "interrupted", None, None)

    def _step_ended(self, step: StepInfo, status: str, duration_s: float | None,
                    error_type: str | None) -> None:
        key = (step.run_id, step.position)
        live = self._steps.pop(key, None)
        if live is None:
            return
        if duration_s is None:
            duration_s = time.perf_counter() - live[0]
        series = (step.step_name, status)
        attributes = self._step_attributes.get(series)
        if attributes is None:  # a few step names and statuses: made once, reused per step
            attributes = self._step_attributes[series] = {
                "garrison.step.name": step.step_name, "garrison.step.status": status}
        self._record_later(self._otel.step.record, duration_s, attributes)
        self.step_durations.observe(series, duration_s,
                                    None if status == "completed" else _exemplar())
        if not self._annotations:
            return
        with self._lock:
            annotations = self._annotations.pop(key, None)
        if annotations is None:
            return
        operation = annotations.get("gen_ai.operation.name")
        if operation is not None and operation != "execute_tool" and status != "interrupted":
            self._model_call(annotations, str(operation), duration_s, error_type)

    def _model_call(self, annotations: Mapping[str, Any], operation: str, duration_s: float,
                    error_type: str | None) -> None:
        # Recorded at once, not in bulk: model calls are few and slow, and a duration's
        # exemplar (its trace) is worth keeping.
        provider = str(annotations.get("gen_ai.provider.name", ""))
        model = str(annotations.get("gen_ai.request.model", ""))
        common = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
                  "gen_ai.request.model": model}
        timing = dict(common)
        if error_type is not None:
            timing["error.type"] = error_type
        self._otel.duration.record(duration_s, timing)
        exemplar = _exemplar()
        self.call_durations.observe((operation, provider, model, error_type or ""),
                                    duration_s, exemplar)
        if error_type is not None:
            return
        response_model = annotations.get("gen_ai.response.model")
        if response_model is not None:
            common["gen_ai.response.model"] = str(response_model)
        for token_type, key in (("input", "gen_ai.usage.input_tokens"),
                                ("output", "gen_ai.usage.output_tokens")):
            count = annotations.get(key)
            if isinstance(count, int):
                self._otel.tokens.record(count, {**common, "gen_ai.token.type": token_type})
                self.token_usage.observe((operation, provider, model, token_type), count,
                                         exemplar)
        cost = annotations.get("garrison.gen_ai.cost_usd")
        if isinstance(cost, int | float) and cost > 0:
            self.cost.add((provider, model), float(cost))
