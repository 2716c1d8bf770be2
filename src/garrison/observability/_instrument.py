"""`instrument`: attach OpenTelemetry tracing and metrics (and Prometheus) to an app."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics, trace
    from prometheus_client import CollectorRegistry
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "garrison.observability.instrument needs OpenTelemetry and prometheus-client: "
        "pip install 'garrison[observability]'") from exc

from garrison import __version__
from garrison.observability._content import Redactor, no_redaction
from garrison.observability._metrics import MetricsHooks, QueueDepth
from garrison.observability._tracing import TracingHooks

if TYPE_CHECKING:
    from garrison.engine import Garrison

__all__ = ["Instrumentation", "instrument"]

_SCOPE = "garrison"


@dataclass(slots=True)
class Instrumentation:
    """What `instrument` attached to an app.

    `registry` is the Prometheus registry holding Garrison's metrics (serve it with
    `prometheus_client.start_http_server(port, registry=registry)`; the CLI's
    `--metrics-port` does).
    """

    app: Garrison
    tracing: TracingHooks
    metrics: MetricsHooks
    registry: CollectorRegistry
    _breakers: set[int]

    def watch_breakers(self) -> None:
        """Follow the state of every circuit breaker shared on the app (as a gauge, and
        as span events on the span current at the transition). Called at each run start:
        breakers registered after `instrument` are picked up then."""
        for breaker in list(self.app.breakers.values()):
            if id(breaker) not in self._breakers and hasattr(breaker, "on_state_change"):
                self._breakers.add(id(breaker))
                breaker.on_state_change(self._breaker_changed)
                self.metrics.breaker_changed(breaker.name, breaker.state)
                for keyed in getattr(breaker, "_keyed", {}).values():  # made before us
                    if id(keyed) not in self._breakers:
                        self._breakers.add(id(keyed))
                        keyed.on_state_change(self._breaker_changed)

    def _breaker_changed(self, breaker: Any, old: str, new: str) -> None:
        self.metrics.breaker_changed(breaker.name, new)  # this app's gauge
        if _event_owner(breaker, self) is not self:  # a breaker shared by several apps
            return  # (a module-level one): one span event, not one per app
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("garrison.breaker.state_change",
                           {"garrison.breaker.name": breaker.name,
                            "garrison.breaker.from": old, "garrison.breaker.to": new})


# Which Instrumentation adds a breaker's state changes to the current span: the first to
# watch it (each app's listener also updates that app's gauge).
_BREAKER_EVENTS: weakref.WeakKeyDictionary[Any, Instrumentation] = weakref.WeakKeyDictionary()


def _event_owner(breaker: Any, instrumentation: Instrumentation) -> Instrumentation:
    try:
        return _BREAKER_EVENTS.setdefault(breaker, instrumentation)
    except TypeError:  # not weakly referable (or not hashable): each app reports its own
        return instrumentation


# One meter per provider: the OpenTelemetry API's proxy provider (in use until
# `set_meter_provider`) makes a new meter per call, and apps on separate meters of one
# provider would register the same instruments twice (the SDK keeps the first one only).
_METERS: weakref.WeakKeyDictionary[metrics.MeterProvider, metrics.Meter] = (
    weakref.WeakKeyDictionary())
_METERS_LOCK = threading.Lock()


def _meter(provider: metrics.MeterProvider) -> metrics.Meter:
    with _METERS_LOCK:
        try:
            meter = _METERS.get(provider)
        except TypeError:  # a provider that cannot be weakly referenced: not cached
            return provider.get_meter(_SCOPE, __version__)
        if meter is None:
            meter = _METERS[provider] = provider.get_meter(_SCOPE, __version__)
        return meter


def instrument(app: Garrison, *, tracer_provider: trace.TracerProvider | None = None,
               meter_provider: metrics.MeterProvider | None = None,
               capture_content: bool = False, redact: Redactor = no_redaction,
               registry: CollectorRegistry | None = None, step_spans: str = "all",
               slow_step_s: float = 0.1) -> Instrumentation:
    """Emit OpenTelemetry spans and metrics, and Prometheus metrics, for `app`'s runs.

    Call before or after `app.open()`; runs executing from then on are traced. Calling
    it again on the same app returns the first `Instrumentation` unchanged.

    Args:
        tracer_provider: where spans go (default: the global provider; without an SDK
            configured, a no-op).
        meter_provider: where OpenTelemetry metrics go (default: the global provider).
        capture_content: record prompts and completions on model-call spans
            (`gen_ai.input.messages`, `gen_ai.output.messages`). Off by default.
        redact: applied to captured messages before they are recorded (default: none;
            governance supplies PII redaction).
        registry: the Prometheus registry for Garrison's metrics (default: a new one,
            in `Instrumentation.registry`).
        step_spans: "all" (default): a span for every live step attempt, current while
            its body runs. "notable": a span only for steps that call `annotate` (model
            and tool calls), fail, are retries, are interrupted or take at least
            `slow_step_s`; quick successful steps are counted on the run's span
            instead. Spares the per-step span cost where steps are many and short
            (see docs/observability.md, "What telemetry costs").
        slow_step_s: with step_spans="notable", the duration from which a successful
            step gets a span (default 0.1 s).
    """
    for hook in app.hooks:
        existing = getattr(hook, "instrumentation", None)
        if isinstance(existing, Instrumentation):
            return existing
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
        _SCOPE, __version__)
    meter = _meter(meter_provider or metrics.get_meter_provider())
    registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
    depth = QueueDepth(app)
    tracing = TracingHooks(tracer, worker_id=app.worker_id, capture_content=capture_content,
                           redact=redact, step_spans=step_spans, slow_step_s=slow_step_s)
    watched: set[int] = set()
    holder: list[Instrumentation] = []

    def on_run() -> None:
        depth.bind_loop()
        holder[0].watch_breakers()

    metrics_hooks = MetricsHooks(meter, registry, depth, on_run)
    instrumentation = Instrumentation(app, tracing, metrics_hooks, registry, watched)
    holder.append(instrumentation)
    tracing.instrumentation = instrumentation  # type: ignore[attr-defined]  # found again above
    instrumentation.watch_breakers()
    app.add_hook(tracing)
    app.add_hook(metrics_hooks)
    return instrumentation
