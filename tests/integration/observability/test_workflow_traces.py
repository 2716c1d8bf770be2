"""Spans of plain workflows: run segments, live steps, retries, children, restarts."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from garrison import Context, EngineHooks, Garrison, RunRecord, RunStatus
from garrison.engine import annotate
from garrison.resilience import CircuitBreaker, Retry
from tests.integration.observability.conftest import Telemetry


async def test_a_run_is_a_segment_span_with_a_span_per_live_step(tmp_path: Path,
                                                                 telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db", worker_id="w-1")
    attempts = {"flaky": 0}

    @app.step(name="flaky", retry=Retry(max_attempts=3, base=0.0, cap=0.0))
    async def flaky() -> str:
        attempts["flaky"] += 1
        annotate(**{"shop.attempt": attempts["flaky"]})
        if attempts["flaky"] < 2:
            raise ConnectionError("reset by peer")
        return "ok"

    @app.step(name="broken")
    async def broken() -> None:
        raise ValueError("bad input")

    @app.workflow(name="order", version="7")
    async def order(ctx: Context) -> str:
        first = await flaky()
        with contextlib.suppress(Exception):
            await broken()
        return first

    telemetry.attach(app)
    async with app:
        assert await (await app.start(order, run_id="o-1")).result(timeout=10) == "ok"

    start = telemetry.one("start_workflow order")
    run = telemetry.one("invoke_workflow order")
    assert start.kind is SpanKind.PRODUCER and run.kind is SpanKind.INTERNAL
    assert run.parent is not None and run.parent.span_id == start.context.span_id
    assert run.context.trace_id == start.context.trace_id
    attrs = dict(run.attributes or {})
    assert attrs["garrison.run_id"] == "o-1" and attrs["garrison.workflow.version"] == "7"
    assert attrs["garrison.worker"] == "w-1" and attrs["garrison.run.resumed"] is False
    assert attrs["garrison.run.outcome"] == "completed"
    assert run.status.status_code is StatusCode.UNSET

    tries = telemetry.named("step flaky")
    assert [dict(s.attributes or {})["garrison.step.attempt"] for s in tries] == [1, 2]
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id for s in tries)
    assert tries[0].status.status_code is StatusCode.ERROR
    assert dict(tries[0].attributes or {})["garrison.step.will_retry"] is True
    assert [e.name for e in tries[0].events] == ["exception"]
    assert dict(tries[1].attributes or {})["shop.attempt"] == 2
    assert tries[1].status.status_code is StatusCode.UNSET
    retry_events = [e for e in run.events if e.name == "garrison.step.retry_scheduled"]
    assert [dict(e.attributes or {})["error.type"] for e in retry_events] == ["ConnectionError"]
    failed = telemetry.one("step broken")
    assert failed.status.status_code is StatusCode.ERROR
    assert "bad input" in (failed.status.description or "")
    assert dict(failed.attributes or {})["garrison.step.will_retry"] is False


async def test_child_workflows_are_children_in_one_trace(tmp_path: Path,
                                                         telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")

    @app.step(name="leaf_work")
    async def leaf_work(n: int) -> int:
        return n * 2

    @app.workflow(name="leaf")
    async def leaf(ctx: Context, n: int) -> int:
        return await leaf_work(n)

    @app.workflow(name="middle")
    async def middle(ctx: Context) -> int:
        handles = [await ctx.start_child(leaf, n) for n in (1, 2)]
        return sum([await h.result() for h in handles])

    @app.workflow(name="root")
    async def root(ctx: Context) -> int:
        child = await ctx.start_child(middle)
        return int(await child.result())

    telemetry.attach(app)
    async with app:
        assert await (await app.start(root, run_id="r")).result(timeout=10) == 6

    spans = telemetry.spans()
    assert len({s.context.trace_id for s in spans}) == 1
    by_id = {s.context.span_id: s for s in spans}

    def parent(span: Any) -> Any:
        assert span.parent is not None
        return by_id[span.parent.span_id]

    # A parent waiting on its children parks; each wake-up is a segment of its own.
    roots = telemetry.named("invoke_workflow root")
    middles = telemetry.named("invoke_workflow middle")
    leaves = telemetry.named("invoke_workflow leaf")
    assert len(leaves) == 2 and roots and middles
    assert {dict(s.attributes or {})["garrison.run.outcome"] for s in roots} <= {
        "parked", "completed"}
    assert all(parent(m) in roots for m in middles)
    assert all(parent(leaf) in middles for leaf in leaves)
    assert {dict(leaf.attributes or {})["garrison.run.parent_id"] for leaf in leaves} == {"r/1"}
    for step in telemetry.named("step leaf_work"):
        assert parent(step) in leaves
    assert len(telemetry.named("start_workflow root")) == 1
    assert not telemetry.named("start_workflow leaf")  # children start inside the parent span


async def test_a_run_resumed_by_another_app_continues_the_same_trace(
        db_url: str, telemetry: Telemetry) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    def make_app(worker_id: str) -> Garrison:
        app = Garrison(db_url, worker_id=worker_id)

        @app.step(name="prepare")
        async def prepare() -> str:
            return "prepared"

        @app.step(name="slow")
        async def slow() -> str:
            entered.set()
            await release.wait()
            return "done"

        @app.workflow(name="long")
        async def long(ctx: Context) -> str:
            await prepare()
            return await slow()

        telemetry.attach(app)
        return app

    first = make_app("w-first")
    async with first:
        handle = await first.start("long", run_id="l-1")
        await asyncio.wait_for(entered.wait(), 10)
    # closed mid-step: the run is handed back, RUNNING, its step interrupted
    release.set()
    second = make_app("w-second")
    async with second:
        assert await second.handle(handle.run_id).result(timeout=20) == "done"

    segments = telemetry.named("invoke_workflow long")
    assert len(segments) == 2
    before, after = sorted(segments, key=lambda s: s.start_time or 0)
    start = telemetry.one("start_workflow long")
    assert {s.context.trace_id for s in telemetry.spans()} == {start.context.trace_id}
    for segment in (before, after):
        assert segment.parent is not None and segment.parent.span_id == start.context.span_id
    b, a = dict(before.attributes or {}), dict(after.attributes or {})
    assert b["garrison.worker"] == "w-first" and b["garrison.run.outcome"] == "released"
    assert "garrison.run.status" not in b  # handed back unfinished
    assert a["garrison.worker"] == "w-second" and a["garrison.run.resumed"] is True
    assert a["garrison.run.status"] == "COMPLETED"
    assert a["garrison.run.replayed_entries"] >= 1 and a["garrison.run.outcome"] == "completed"
    assert [link.context.span_id for link in after.links] == [start.context.span_id]
    assert [e.name for e in after.events][:2] == ["garrison.run.resumed",
                                                  "garrison.run.recovered"]
    # a graceful close hands the run back: a recovery, naming the worker that stopped
    assert dict(after.events[1].attributes or {}) == {
        "garrison.run.claim_reason": "handed_back", "garrison.run.previous_worker": "w-first"}
    assert a["garrison.run.claim_reason"] == "handed_back"
    # prepare ran once (in the first segment); slow twice: interrupted, then completed
    assert len(telemetry.named("step prepare")) == 1
    slow = sorted(telemetry.named("step slow"), key=lambda s: s.start_time or 0)
    assert [s.parent.span_id for s in slow if s.parent] == [before.context.span_id,
                                                            after.context.span_id]
    assert [e.name for e in slow[0].events] == ["garrison.step.interrupted"]


async def test_a_run_started_without_telemetry_is_one_trace_across_its_segments(
        tmp_path: Path, telemetry: Telemetry) -> None:
    url = f"sqlite:///{tmp_path}/g.db"

    def define(app: Garrison) -> Any:
        @app.step(name="work")
        async def work(i: int) -> int:
            return i

        @app.workflow(name="napper")
        async def napper(ctx: Context) -> int:
            await work(1)
            await ctx.sleep(0.2)  # parks: the wake-up is a second segment
            return await work(2)

        return napper

    client = Garrison(url, worker=False)  # an API process, not instrumented
    napper = define(client)
    worker = Garrison(url, claim_interval_s=0.05)
    define(worker)
    telemetry.attach(worker)
    async with client, worker:
        handle = await client.start(napper, run_id="n-1")
        assert (await handle.record()).trace_context is None  # nothing to continue
        assert await handle.result(timeout=20) == 2

    segments = sorted(telemetry.named("invoke_workflow napper"),
                      key=lambda s: s.start_time or 0)
    assert len(segments) == 2 and dict(segments[1].attributes or {})["garrison.run.resumed"]
    assert len({s.context.trace_id for s in telemetry.spans()}) == 1
    parents = {s.parent.span_id for s in segments if s.parent is not None}
    assert len(parents) == 1  # both under the same (derived) parent
    assert all(not s.links for s in segments)  # no link to a span that was never made


class _GarbageTraceContext(EngineHooks):
    def trace_context(self, run: RunRecord) -> str | None:
        return "00-not-a-trace-01 junk=1"


async def test_a_malformed_stored_traceparent_starts_a_new_trace(tmp_path: Path,
                                                                 telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db", hooks=[_GarbageTraceContext()])

    @app.step(name="work")
    async def work() -> int:
        return 1

    @app.workflow(name="plain")
    async def plain(ctx: Context) -> int:
        return await work()

    telemetry.attach(app)
    async with app:
        handle = await app.start(plain, run_id="p")
        assert await handle.result(timeout=10) == 1
        stored = await app.store.get_run("p")
        assert stored is not None and stored.trace_context == "00-not-a-trace-01 junk=1"
        assert stored.status is RunStatus.COMPLETED

    run = telemetry.one("invoke_workflow plain")
    assert run.parent is None  # a root of its own trace
    step = telemetry.one("step work")
    assert step.context.trace_id == run.context.trace_id
    assert not telemetry.named("start_workflow plain")  # the first hook's context won


@pytest.mark.parametrize("shared", [False, True])
async def test_breaker_transitions_and_rejections_are_span_events_and_a_gauge(
        tmp_path: Path, telemetry: Telemetry, shared: bool) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    breaker = CircuitBreaker("payments", window=2, min_calls=2, wait_open=600)
    other = Garrison(f"sqlite:///{tmp_path}/other.db")  # a module-level breaker: both apps
    if shared:
        other.step(name="charge", breaker=breaker)(lambda: None)
        other_instrumentation = telemetry.attach(other)

    @app.step(name="charge", breaker=breaker)
    async def charge() -> None:
        raise ConnectionError("payments down")

    @app.workflow(name="checkout")
    async def checkout(ctx: Context) -> list[str]:
        seen = []
        for _ in range(3):
            try:
                await charge()
            except Exception as exc:
                seen.append(type(exc).__name__)
        return seen

    instrumentation = telemetry.attach(app)
    async with app:
        result = await (await app.start(checkout, run_id="c")).result(timeout=10)
    assert result == ["ConnectionError", "ConnectionError", "CircuitOpenError"]

    charges = sorted(telemetry.named("step charge"), key=lambda s: s.start_time or 0)
    changes = [dict(e.attributes or {}) for e in charges[1].events
               if e.name == "garrison.breaker.state_change"]
    assert changes == [{"garrison.breaker.name": "payments", "garrison.breaker.from": "CLOSED",
                        "garrison.breaker.to": "OPEN"}]
    rejected = [dict(e.attributes or {}) for e in charges[2].events
                if e.name == "garrison.breaker.rejected"]
    assert rejected == [{"garrison.breaker.name": "payments", "garrison.breaker.state": "OPEN"}]
    gauge = instrumentation.registry.get_sample_value("garrison_breaker_state",
                                                      {"breaker": "payments"})
    assert gauge == 2  # open
    if shared:  # one event on the span, not one per instrumented app; each app's gauge
        assert other_instrumentation.registry.get_sample_value(
            "garrison_breaker_state", {"breaker": "payments"}) == 2


class _StepEvents(EngineHooks):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def step_completed(self, step: Any, duration_s: float) -> None:
        self.seen.append("completed")

    def step_failed(self, step: Any, error: BaseException, will_retry: bool) -> None:
        self.seen.append(f"failed retry={will_retry}")

    def step_committed(self, step: Any) -> None:
        self.seen.append("committed")


async def test_a_step_whose_result_cannot_be_stored_is_reported_failed(
        tmp_path: Path, telemetry: Telemetry) -> None:
    events = _StepEvents()
    app = Garrison(f"sqlite:///{tmp_path}/g.db", hooks=[events])

    @app.step(name="opaque")
    async def opaque() -> object:
        return object()  # no JSON for it: journaled FAILED

    @app.workflow(name="wf", quarantine=False)
    async def wf(ctx: Context) -> None:
        await opaque()

    metrics = telemetry.attach(app).metrics
    async with app:
        with contextlib.suppress(Exception):
            await (await app.start(wf, run_id="u")).result(timeout=10)
        [entry] = await app.store.load_journal("u")
        assert entry.status.value == "failed"

    span = telemetry.one("step opaque")
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "SerializationError"
    assert {key for key, _ in metrics.step_durations.snapshot()} == {("opaque", "failed")}
    assert events.seen == ["failed retry=False", "committed"]  # as any journaled failure


@pytest.mark.parametrize("traceparent", [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # well formed: continued
    "00-0af7651916cd43dd8448eb211c80319c-zzzz6b7169203331-01",  # malformed: a new trace
    "not a header at all",
])
async def test_an_inbound_traceparent_is_continued_or_if_malformed_starts_a_new_trace(
        tmp_path: Path, telemetry: Telemetry, traceparent: str) -> None:
    """A service extracts the caller's header (OpenTelemetry's W3C propagator, as its
    HTTP instrumentation does) and starts a run under it."""
    app = Garrison(f"sqlite:///{tmp_path}/g.db")

    @app.workflow(name="inbound")
    async def inbound(ctx: Context) -> str:
        return "served"

    telemetry.attach(app)
    inbound_context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    async with app:
        token = otel_context.attach(inbound_context)
        try:
            handle = await app.start(inbound, run_id="in-1")
        finally:
            otel_context.detach(token)
        assert await handle.result(timeout=10) == "served"

    start = telemetry.one("start_workflow inbound")
    segment = telemetry.one("invoke_workflow inbound")
    assert segment.parent is not None and segment.parent.span_id == start.context.span_id
    assert segment.context.trace_id == start.context.trace_id
    if traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-b7ad"):
        assert start.parent is not None and start.parent.span_id == 0xb7ad6b7169203331
        assert start.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    else:
        assert start.parent is None  # a root: the header is ignored, the run goes on
        assert start.context.trace_id != 0x0af7651916cd43dd8448eb211c80319c
