"""instrument(step_spans="notable"): spans only for steps worth reading; the rest counted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NoOpTracerProvider, StatusCode

from garrison import Context, Garrison
from garrison.engine import annotate, record_event
from garrison.observability import instrument
from garrison.resilience import Retry
from tests.integration.observability.conftest import Telemetry


def _app(tmp_path: Path) -> tuple[Garrison, Callable[..., Coroutine[Any, Any, str]]]:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    attempts = {"flaky": 0}

    @app.step(name="quick")
    async def quick(i: int) -> int:
        return i

    @app.step(name="slow")
    async def slow() -> str:
        await asyncio.sleep(0.06)
        return "slow"

    @app.step(name="described")
    async def described() -> str:
        annotate(**{"shop.order": "o-7"})
        # made current from annotate() on: a span the body makes now is its child
        with trace.get_tracer("shop").start_as_current_span("shop.lookup"):
            pass
        return "described"

    @app.step(name="eventful")
    async def eventful() -> str:
        record_event("shop.checked", items=2)
        return "eventful"

    @app.step(name="delegating")
    async def delegating() -> str:
        async def helper() -> None:  # another task: the span is made, not made current
            annotate(**{"shop.helper": True})
        await asyncio.create_task(helper())
        return "delegating"

    @app.step(name="flaky", retry=Retry(max_attempts=2, base=0.0, cap=0.0))
    async def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise ConnectionError("reset by peer")
        return "ok"

    @app.step(name="broken")
    async def broken() -> None:
        raise ValueError("bad input")

    @app.workflow(name="mixed")
    async def mixed(ctx: Context) -> str:
        for i in range(5):
            await quick(i)
        await slow()
        await described()
        await eventful()
        await delegating()
        await flaky()
        with contextlib.suppress(ValueError):
            await broken()
        return "done"

    return app, mixed


async def test_notable_steps_have_spans_and_quick_ones_are_counted(
        tmp_path: Path, telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(trace, "get_tracer",
                        lambda name, *a, **k: telemetry.tracer_provider.get_tracer(name))
    app, mixed = _app(tmp_path)
    instrumentation = telemetry.attach(app, step_spans="notable", slow_step_s=0.05)
    async with app:
        assert await (await app.start(mixed, run_id="m")).result(
            timeout=10) == "done"
    tracing = instrumentation.tracing
    assert not tracing._quiet and not tracing._steps and not tracing._segments  # no leftovers

    names = sorted(s.name for s in telemetry.spans() if s.name.startswith("step "))
    assert names == ["step broken", "step delegating", "step described", "step eventful",
                     "step flaky", "step flaky", "step slow"]
    run = telemetry.one("invoke_workflow mixed")
    assert dict(run.attributes or {})["garrison.run.steps_unspanned"] == 5
    for span in telemetry.spans():
        if span.name.startswith("step "):
            assert span.parent is not None and span.parent.span_id == run.context.span_id
            assert span.start_time is not None and span.end_time is not None
            assert run.start_time is not None and span.start_time >= run.start_time
    slow = telemetry.one("step slow")
    assert slow.end_time is not None and slow.start_time is not None
    assert slow.end_time - slow.start_time >= 50_000_000  # from the step's own start
    described = telemetry.one("step described")
    assert dict(described.attributes or {})["shop.order"] == "o-7"
    lookup = telemetry.one("shop.lookup")
    assert lookup.parent is not None and lookup.parent.span_id == described.context.span_id
    eventful = telemetry.one("step eventful")
    assert [(e.name, dict(e.attributes or {})) for e in eventful.events] == [
        ("shop.checked", {"items": 2})]
    delegating = telemetry.one("step delegating")
    assert dict(delegating.attributes or {})["shop.helper"] is True
    assert not [r for r in caplog.records if "detach" in r.getMessage()]
    first, second = telemetry.named("step flaky")
    assert first.status.status_code is StatusCode.ERROR
    assert dict(first.attributes or {})["garrison.step.will_retry"] is True
    assert second.status.status_code is StatusCode.UNSET  # a retried step's success
    broken = telemetry.one("step broken")
    assert broken.status.status_code is StatusCode.ERROR
    assert [e.name for e in broken.events] == ["exception"]


async def test_all_is_the_default_and_spans_every_step(tmp_path: Path,
                                                       telemetry: Telemetry) -> None:
    app, mixed = _app(tmp_path)
    telemetry.attach(app)
    async with app:
        await (await app.start(mixed, run_id="m")).result(timeout=10)
    assert len(telemetry.named("step quick")) == 5
    run = telemetry.one("invoke_workflow mixed")
    assert "garrison.run.steps_unspanned" not in dict(run.attributes or {})


def test_bad_step_span_options_name_the_field(tmp_path: Path, telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    with pytest.raises(ValueError, match=r"step_spans='some'.*'all', 'notable'"):
        telemetry.attach(app, step_spans="some")
    with pytest.raises(ValueError, match=r"slow_step_s=-1"):
        telemetry.attach(app, step_spans="notable", slow_step_s=-1)
    assert not app.hooks  # nothing attached by a refused call


def _count_step_spans(tracing: Any) -> list[int]:
    """A list that grows by one each time `tracing` asks its tracer for a step span."""
    started: list[int] = []
    original = tracing._step_span

    def counted(*args: Any) -> Any:
        started.append(1)
        return original(*args)

    tracing._step_span = counted
    return started


async def _step_contexts(app: Garrison) -> list[trace.SpanContext]:
    """The span context current in each of two steps of one run."""
    seen: list[trace.SpanContext] = []

    @app.step(name="look")
    async def look() -> None:
        seen.append(trace.get_current_span().get_span_context())

    @app.workflow(name="looks")
    async def looks(ctx: Context) -> None:
        await look()
        await look()

    async with app:
        await (await app.start(looks, run_id="l")).result(timeout=10)
    return seen


async def test_a_sampled_out_run_still_gives_each_step_a_context(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    instrument(app, tracer_provider=provider)
    first, second = await _step_contexts(app)
    provider.shutdown()
    # not recorded, but propagated: an outbound call from a step carries the trace
    assert first.is_valid and second.is_valid and not first.trace_flags.sampled
    assert first.trace_id == second.trace_id and first.span_id != second.span_id
    assert exporter.get_finished_spans() == ()


async def test_a_tracer_that_makes_nothing_costs_no_step_spans(tmp_path: Path) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    tracing = instrument(app, tracer_provider=NoOpTracerProvider()).tracing
    started = _count_step_spans(tracing)
    contexts = await _step_contexts(app)
    assert [c.is_valid for c in contexts] == [False, False]
    assert started == [] and tracing._steps == {}  # no span asked for, nothing kept


async def test_a_quick_step_interrupted_gets_its_span_from_its_start(
        tmp_path: Path, telemetry: Telemetry) -> None:
    entered = asyncio.Event()
    app = Garrison(f"sqlite:///{tmp_path}/g.db")

    @app.step(name="waiting")
    async def waiting() -> str:
        entered.set()
        await asyncio.Event().wait()  # until the app closes
        return "never"

    @app.workflow(name="held")
    async def held(ctx: Context) -> str:
        return await waiting()

    tracing = telemetry.attach(app, step_spans="notable", slow_step_s=60).tracing
    async with app:
        await app.start(held, run_id="h")
        await asyncio.wait_for(entered.wait(), 10)
        await asyncio.sleep(0.02)
    assert not tracing._quiet and not tracing._steps and not tracing._segments
    step = telemetry.one("step waiting")  # closed mid-step: interrupted, so notable
    assert [e.name for e in step.events] == ["garrison.step.interrupted"]
    assert step.start_time is not None and step.end_time is not None
    assert step.end_time - step.start_time >= 20_000_000  # from the step's own start
    run = telemetry.one("invoke_workflow held")
    assert dict(run.attributes or {})["garrison.run.steps_unspanned"] == 0


async def test_a_worker_that_makes_nothing_asks_no_step_span_for_a_run_stored_traced(
        tmp_path: Path, telemetry: Telemetry) -> None:
    url = f"sqlite:///{tmp_path}/g.db"
    client = Garrison(url, worker=False)  # the API process: an SDK, a stored context
    telemetry.attach(client)
    worker = Garrison(url)
    tracing = instrument(worker, tracer_provider=NoOpTracerProvider()).tracing
    started = _count_step_spans(tracing)
    seen: list[trace.SpanContext] = []
    for app in (client, worker):
        @app.step(name="look")
        async def look() -> None:
            seen.append(trace.get_current_span().get_span_context())

        @app.workflow(name="looks")
        async def looks(ctx: Context) -> None:
            await look()
            await look()

    async with worker, client:
        await (await client.start(looks, run_id="l")).result(timeout=10)
    (enqueue,) = telemetry.named("start_workflow looks")
    # no span asked for, nothing kept; the stored context still reaches outbound calls
    assert started == [] and tracing._steps == {}
    assert [c.span_id for c in seen] == [enqueue.context.span_id] * 2


async def test_instrument_after_open_makes_no_step_span_under_the_launching_span(
        tmp_path: Path, telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    gate = asyncio.Event()

    @app.step(name="first")
    async def first() -> None:
        await gate.wait()

    @app.step(name="second")
    async def second() -> None:
        pass

    @app.workflow(name="late")
    async def late(ctx: Context) -> None:
        await first()
        await second()

    tracer = telemetry.tracer_provider.get_tracer("api")
    async with app:
        with tracer.start_as_current_span("http POST /orders"):
            handle = await app.start(late, run_id="l")  # its task inherits this context
        await asyncio.sleep(0.05)  # the run is in `first`, untraced
        tracing = telemetry.attach(app).tracing
        gate.set()
        await handle.result(timeout=10)
    (request,) = telemetry.named("http POST /orders")
    assert not [s for s in telemetry.spans() if s.parent is not None
                and s.parent.span_id == request.context.span_id]
    assert not tracing._steps and not tracing._quiet
