"""Metrics from engine hooks, to an OpenTelemetry meter and a Prometheus registry.

Labels are low-cardinality only: workflow, step, status, queue, model, breaker, token
type. Never a run id: a run is found from its trace (or `garrison runs show`).

Step durations, the one measurement made at every step, reach OpenTelemetry in bulk:
each is queued (a deque append) and the queue is recorded into the histogram when the
metrics are collected (an observable instrument's callback runs before the collection
reads the histograms) or once it holds `_FLUSH_AT` values. The values and their
aggregation are the same; recording them in one loop costs a fraction of recording
each between two journal commits (measured in benchmarks/observability_overhead.py).
Such a measurement carries no exemplar (no trace context at collection time).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from garrison.engine import EngineHooks, StepInfo
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
_UNKNOWN = "unknown"  # a run ended here without executing here (a cancel of a queued run)
_FLUSH_AT = 2048  # step durations queued for OpenTelemetry before they are recorded anyway


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

    def bind_loop(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()

    def read(self) -> dict[str, int] | None:
        loop = self.loop
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
        depth.update(Tally(run.queue for run in runs))
        return depth


class _QueueDepthCollector(Collector):
    def __init__(self, depth: QueueDepth) -> None:
        self.depth = depth

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("garrison_queue_depth", "Runs waiting in each queue "
                                   "(PENDING), read from the store at scrape time.",
                                   labels=["queue"])
        for queue, count in sorted((self.depth.read() or {}).items()):
            family.add_metric([queue], count)
        yield family


class MetricsHooks(EngineHooks):
    """Engine hooks that count runs, time steps and model calls (see the module docs)."""

    def __init__(self, meter: Meter, registry: CollectorRegistry, depth: QueueDepth,
                 on_run: Callable[[], None]) -> None:
        self.depth = depth
        self._on_run = on_run
        self._workflows: dict[str, str] = {}
        self._steps: dict[tuple[str, str], float] = {}  # live step -> perf_counter at start
        self._annotations: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._step_series: dict[tuple[str, str], tuple[dict[str, str], Any]] = {}
        self._queued: deque[tuple[float, dict[str, str]]] = deque()  # step durations
        # OpenTelemetry
        self._o_started = meter.create_counter(
            "garrison.runs.started", unit="{run}", description="Runs started")
        self._o_finished = meter.create_counter(
            "garrison.runs.finished", unit="{run}", description="Runs ended, by status")
        self._o_resumed = meter.create_counter(
            "garrison.runs.resumed", unit="{run}",
            description="Run segments resumed from a journal (recoveries, wake-ups)")
        self._o_step = meter.create_histogram(
            "garrison.step.duration", unit="s", description="Live step attempts")
        self._o_retries = meter.create_counter(
            "garrison.step.retries", unit="{retry}", description="Step retries scheduled")
        self._o_wait = meter.create_histogram(
            "garrison.queue.wait_time", unit="s",
            description="Time from a run's creation to its first start")
        self._o_leases = meter.create_counter(
            "garrison.lease.lost", unit="{run}",
            description="Runs taken over by another worker (this worker's lease ran out)")
        self._o_breaker = meter.create_gauge(
            "garrison.breaker.state", description="0 closed, 1 half-open, 2 open, "
            "3 forced open, 4 disabled")
        self._o_tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used by model calls",
            explicit_bucket_boundaries_advisory=list(_TOKEN_BUCKETS))
        self._o_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Model call duration",
            explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS))
        self._o_cost = meter.create_counter(
            "garrison.gen_ai.cost", unit="USD", description="Model call cost")
        self._o_events = meter.create_counter(
            "garrison.events", unit="{event}",
            description="Garrison's own run events (model fallbacks, supervisor restarts)")
        meter.create_observable_gauge("garrison.queue.depth", [self._observe_depth],
                                      unit="{run}", description="Runs waiting per queue")
        # Prometheus
        def counter(name: str, doc: str, labels: Iterable[str]) -> Counter:
            return Counter(name, doc, list(labels), registry=registry)

        self._p_started = counter("garrison_runs_started", "Runs started.", ["workflow"])
        self._p_finished = counter("garrison_runs_finished", "Runs ended, by status.",
                                   ["workflow", "status"])
        self._p_resumed = counter("garrison_runs_resumed", "Run segments resumed from a "
                                  "journal (recoveries, wake-ups).", ["workflow"])
        self._p_step = Histogram("garrison_step_duration_seconds", "Live step attempts.",
                                 ["step", "status"], registry=registry, buckets=_STEP_BUCKETS)
        self._p_retries = counter("garrison_step_retries", "Step retries scheduled.", ["step"])
        self._p_wait = Histogram("garrison_queue_wait_seconds", "Time from a run's creation "
                                 "to its first start.", ["queue"], registry=registry,
                                 buckets=_STEP_BUCKETS)
        self._p_leases = counter("garrison_lease_lost", "Runs taken over by another worker.",
                                 [])
        self._p_breaker = Gauge("garrison_breaker_state", "Circuit breaker state: 0 closed, "
                                "1 half-open, 2 open, 3 forced open, 4 disabled.", ["breaker"],
                                registry=registry)
        self._p_tokens = Histogram(
            "garrison_gen_ai_client_token_usage", "Tokens used by model calls.",
            ["operation", "provider", "model", "token_type"], registry=registry,
            buckets=_TOKEN_BUCKETS)
        self._p_duration = Histogram(
            "garrison_gen_ai_client_operation_duration_seconds", "Model call duration.",
            ["operation", "provider", "model", "error_type"], registry=registry,
            buckets=_DURATION_BUCKETS)
        self._p_cost = counter("garrison_gen_ai_cost_usd", "Model call cost in USD.",
                               ["provider", "model"])
        self._p_events = counter("garrison_events", "Garrison's own run events (model "
                                 "fallbacks, supervisor restarts), by name.", ["event"])
        registry.register(_QueueDepthCollector(depth))

    def flush(self) -> None:
        """Record the queued step durations into the OpenTelemetry histogram (safe from
        any thread: each value is taken off the queue once)."""
        queued, record = self._queued, self._o_step.record
        while True:
            try:
                value, attributes = queued.popleft()
            except IndexError:
                return
            record(value, attributes)

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        self.flush()  # collection reads the histograms after the callbacks
        return [Observation(count, {"garrison.queue": queue})
                for queue, count in (self.depth.read() or {}).items()]

    # -- runs ----------------------------------------------------------------------

    def run_started(self, run: RunRecord) -> None:
        self._on_run()
        self._workflows[run.run_id] = run.workflow_name
        self._o_started.add(1, {"garrison.workflow.name": run.workflow_name})
        self._p_started.labels(run.workflow_name).inc()
        wait = max(0.0, (run.started_at or run.created_at) - run.created_at)
        self._o_wait.record(wait, {"garrison.queue": run.queue})
        self._p_wait.labels(run.queue).observe(wait)

    def run_resumed(self, run: RunRecord, replayed_entries: int) -> None:
        self._on_run()
        self._workflows[run.run_id] = run.workflow_name
        self._o_resumed.add(1, {"garrison.workflow.name": run.workflow_name})
        self._p_resumed.labels(run.workflow_name).inc()

    def run_finished(self, run_id: str, status: RunStatus) -> None:
        workflow = self._workflows.get(run_id, _UNKNOWN)
        self._o_finished.add(1, {"garrison.workflow.name": workflow,
                                 "garrison.run.status": status.value})
        self._p_finished.labels(workflow, status.value).inc()

    def run_detached(self, run_id: str) -> None:
        self._workflows.pop(run_id, None)

    def run_event(self, run_id: str, step: StepInfo | None, name: str,
                  attributes: Mapping[str, Any]) -> None:
        if name.startswith("garrison."):  # the application's own names may be unbounded
            self._o_events.add(1, {"garrison.event.name": name})
            self._p_events.labels(name).inc()

    def lease_lost(self, run_id: str) -> None:
        self._o_leases.add(1)
        self._p_leases.inc()

    def breaker_changed(self, name: str, state: str) -> None:
        value = BREAKER_STATES.get(state, -1)
        self._o_breaker.set(value, {"garrison.breaker.name": name})
        self._p_breaker.labels(name).set(value)

    # -- steps ---------------------------------------------------------------------

    def step_started(self, step: StepInfo) -> None:
        self._steps[(step.run_id, step.position)] = time.perf_counter()

    def step_annotated(self, step: StepInfo, attributes: Mapping[str, Any]) -> None:
        key = (step.run_id, step.position)
        if key not in self._steps:
            return
        with self._lock:  # a synchronous step annotates from its thread
            self._annotations.setdefault(key, {}).update(attributes)

    def step_completed(self, step: StepInfo, duration_s: float) -> None:
        self._step_ended(step, "completed", duration_s, None)

    def step_failed(self, step: StepInfo, error: BaseException, will_retry: bool) -> None:
        if will_retry:
            self._o_retries.add(1, {"garrison.step.name": step.step_name})
            self._p_retries.labels(step.step_name).inc()
        self._step_ended(step, "retried" if will_retry else "failed", None,
                         type(error).__qualname__)

    def step_interrupted(self, step: StepInfo, error: BaseException) -> None:
        self._step_ended(step, "interrupted", None, None)

    def _step_ended(self, step: StepInfo, status: str, duration_s: float | None,
                    error_type: str | None) -> None:
        key = (step.run_id, step.position)
        began = self._steps.pop(key, None)
        if began is None:
            return
        if duration_s is None:
            duration_s = time.perf_counter() - began
        series = (step.step_name, status)
        bound = self._step_series.get(series)
        if bound is None:  # a few step names and statuses: made once, reused per step
            bound = ({"garrison.step.name": step.step_name, "garrison.step.status": status},
                     self._p_step.labels(step.step_name, status))
            self._step_series[series] = bound
        self._queued.append((duration_s, bound[0]))
        if len(self._queued) >= _FLUSH_AT:
            self.flush()
        bound[1].observe(duration_s)
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
        provider = str(annotations.get("gen_ai.provider.name", ""))
        model = str(annotations.get("gen_ai.request.model", ""))
        common = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
                  "gen_ai.request.model": model}
        timing = dict(common)
        if error_type is not None:
            timing["error.type"] = error_type
        self._o_duration.record(duration_s, timing)
        self._p_duration.labels(operation, provider, model, error_type or "").observe(
            duration_s)
        if error_type is not None:
            return
        response_model = annotations.get("gen_ai.response.model")
        if response_model is not None:
            common["gen_ai.response.model"] = str(response_model)
        for token_type, key in (("input", "gen_ai.usage.input_tokens"),
                                ("output", "gen_ai.usage.output_tokens")):
            count = annotations.get(key)
            if isinstance(count, int):
                self._o_tokens.record(count, {**common, "gen_ai.token.type": token_type})
                self._p_tokens.labels(operation, provider, model, token_type).observe(count)
        cost = annotations.get("garrison.gen_ai.cost_usd")
        if isinstance(cost, int | float) and cost > 0:
            self._o_cost.add(float(cost), {"gen_ai.provider.name": provider,
                                           "gen_ai.request.model": model})
            self._p_cost.labels(provider, model).inc(float(cost))
