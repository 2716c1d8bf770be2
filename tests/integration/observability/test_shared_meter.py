"""Apps instrumented on one meter provider are all counted, even when the provider hands
out a new meter per call (the OpenTelemetry API's proxy, before `set_meter_provider`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from garrison import Context, Garrison
from garrison.observability import instrument
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


async def test_apps_on_meters_of_one_provider_are_all_counted(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    per_call = _MeterPerCall(provider)
    apps = [Garrison(f"sqlite:///{tmp_path}/{name}.db") for name in ("one", "two")]
    for app in apps:
        @app.step(name="work")
        async def work() -> int:
            return 1

        @app.workflow(name="job")
        async def job(ctx: Context) -> int:
            return await work()

        instrument(app, meter_provider=per_call)
    for index, app in enumerate(apps):
        async with app:
            for n in range(index + 1):  # one run in the first app, two in the second
                await (await app.start("job", run_id=f"r{n}")).result(timeout=10)
    points = metric_points(reader)
    [started] = points["garrison.runs.started"]
    assert started.value == 3
    [steps] = points["garrison.step.duration"]
    assert steps.count == 3  # both apps' queues flushed
    provider.shutdown()
