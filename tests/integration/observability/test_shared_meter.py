"""Apps instrumented on one meter provider are all counted, even when the provider hands
out a new meter per call (the OpenTelemetry API's proxy, before `set_meter_provider`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest

from garrison import Context, Garrison
from garrison.observability import instrument
from garrison.resilience import CircuitBreaker
from tests.otel import metric_points


class _Fresh:
    """A meter object of its own, forwarding to the real meter."""

    def __init__(self, real: metrics.Meter) -> None:
        self.real = real

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.real, attribute)


class _MeterPerCall(metrics.MeterProvider):
    """A new meter object at every `get_meter`, all feeding one SDK meter, as the API's
    proxy provider does once the real provider is set."""

    def __init__(self, real: MeterProvider) -> None:
        self.real = real

    def get_meter(self, name: str, version: str | None = None,
                  schema_url: str | None = None, attributes: Any = None) -> metrics.Meter:
        return cast(metrics.Meter, _Fresh(self.real.get_meter(name, version, schema_url,
                                                              attributes)))


def _job_apps(tmp_path: Path) -> list[Garrison]:
    """Two apps, each with a one-step workflow `job`."""
    apps = [Garrison(f"sqlite:///{tmp_path}/{name}.db") for name in ("one", "two")]
    for app in apps:
        @app.step(name="work")
        async def work() -> int:
            return 1

        @app.workflow(name="job")
        async def job(ctx: Context) -> int:
            return await work()

    return apps


async def _run_jobs(apps: list[Garrison]) -> None:
    for index, app in enumerate(apps):
        async with app:
            for n in range(index + 1):  # one run in the first app, two in the second
                await (await app.start("job", run_id=f"r{n}")).result(timeout=10)


async def test_apps_on_meters_of_one_provider_are_all_counted(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    per_call = _MeterPerCall(provider)
    apps = _job_apps(tmp_path)
    for app in apps:
        instrument(app, meter_provider=per_call)
    await _run_jobs(apps)
    points = metric_points(reader)
    [started] = points["garrison.runs.started"]
    assert started.value == 3
    [steps] = points["garrison.step.duration"]
    assert steps.count == 3  # both apps' queues flushed
    provider.shutdown()


async def test_apps_on_one_prometheus_registry_are_all_exposed(tmp_path: Path) -> None:
    registry = CollectorRegistry(auto_describe=True)
    apps = _job_apps(tmp_path)
    for app in apps:
        app.share_breaker(CircuitBreaker(f"llm-{Path(app.store.url).stem}"))
        instrument(app, registry=registry, meter_provider=metrics.NoOpMeterProvider())
    await _run_jobs(apps)
    value = registry.get_sample_value
    assert value("garrison_runs_started_total", {"workflow": "job"}) == 3
    assert value("garrison_step_duration_seconds_count",
                 {"step": "work", "status": "completed"}) == 3
    for app in apps:  # each app's breakers, on the one gauge
        for name in app.breakers:
            assert value("garrison_breaker_state", {"breaker": name}) == 0
    text = generate_latest(registry).decode()
    assert text.count("# TYPE garrison_runs_started_total counter") == 1


def test_a_registry_no_longer_used_is_not_kept() -> None:
    import gc
    import weakref

    from garrison.observability import _metrics

    registry = CollectorRegistry()
    _metrics._registry_view(registry)
    gone = weakref.ref(registry)
    del registry
    gc.collect()
    assert gone() is None  # the view does not hold its key alive
