"""Metrics (OpenTelemetry reader and Prometheus scrape), OTLP/HTTP export to a local
receiver, and the cost of not instrumenting: nothing imported, nothing emitted."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx2 as httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from garrison import Context, Garrison
from garrison.agents import Agent, OpenAIModel
from garrison.observability import instrument
from garrison.observability._metrics import _STEP_BUCKETS
from garrison.resilience import Retry
from garrison.testing import LLMServer
from tests.integration.observability.conftest import Telemetry


@pytest.fixture(scope="module")
def server() -> Iterator[LLMServer]:
    with LLMServer({"default": {"content": "Hello there."}}) as running:
        yield running


async def test_metrics_count_runs_steps_retries_and_model_tokens(
        tmp_path: Path, server: LLMServer, telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    failures = iter([True, False])

    @app.step(name="charge", retry=Retry(max_attempts=2, base=0.0, cap=0.0))
    async def charge() -> None:
        if next(failures):
            raise ConnectionError("flaky")

    @app.workflow(name="pay")
    async def pay(ctx: Context) -> None:
        await charge()

    agent = Agent("greeter", model=OpenAIModel("gpt-test", base_url=server.openai_base_url,
                                              api_key="sk-test"))
    telemetry.attach(app)
    async with app:
        await (await app.start(pay, run_id="p")).result(timeout=10)
        await agent.run(app, "hello", run_id="a")

    def by(metric: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        return {tuple(sorted(dict(p.attributes).items())): p  # type: ignore[attr-defined]
                for p in telemetry.points(metric)}

    finished = by("garrison.runs.finished")
    assert finished[(("garrison.run.status", "COMPLETED"),
                     ("garrison.workflow.name", "pay"))].value == 1  # type: ignore[attr-defined]
    assert finished[(("garrison.run.status", "COMPLETED"),
                     ("garrison.workflow.name", "agent:greeter"))].value == 1  # type: ignore[attr-defined]
    assert by("garrison.step.retries")[(("garrison.step.name", "charge"),)].value == 1  # type: ignore[attr-defined]
    steps = by("garrison.step.duration")
    for status in ("retried", "completed"):
        key = (("garrison.step.name", "charge"), ("garrison.step.status", status))
        assert steps[key].count == 1
    # seconds, in the Prometheus histograms' buckets (the SDK's default ones are for ms)
    for metric in ("garrison.step.duration", "garrison.queue.wait_time"):
        for point in telemetry.points(metric):
            assert tuple(point.explicit_bounds) == _STEP_BUCKETS, metric  # type: ignore[attr-defined]
    tokens = {dict(p.attributes)["gen_ai.token.type"]: p  # type: ignore[attr-defined]
              for p in telemetry.points("gen_ai.client.token.usage")}
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].sum > 0 and tokens["output"].count == 1  # type: ignore[attr-defined]
    assert dict(tokens["input"].attributes)["gen_ai.request.model"] == "gpt-test"  # type: ignore[attr-defined]
    [duration] = telemetry.points("gen_ai.client.operation.duration")
    assert duration.count == 1  # type: ignore[attr-defined]
    everything = str([p.attributes for m in ("garrison.runs.finished", "garrison.step.duration",  # type: ignore[attr-defined]
                                             "gen_ai.client.token.usage")
                      for p in telemetry.points(m)])
    assert "'p'" not in everything and "'a'" not in everything  # never a run id


async def test_prometheus_scrape_during_a_run_has_names_types_and_labels(
        tmp_path: Path, telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    app.queue("slow-lane", concurrency=1)
    entered, release = asyncio.Event(), asyncio.Event()

    @app.step(name="wait_here")
    async def wait_here() -> None:
        entered.set()
        await release.wait()

    @app.workflow(name="held")
    async def held(ctx: Context) -> None:
        await wait_here()

    instrumentation = telemetry.attach(app)
    assert instrument(app) is instrumentation  # idempotent
    http_server, thread = start_http_server(0, addr="127.0.0.1",
                                            registry=instrumentation.registry)
    port = http_server.server_port
    try:
        async with app:
            await app.start(held, run_id="run-held-1", queue="slow-lane")
            await app.start(held, run_id="run-held-2", queue="slow-lane")  # waits its turn
            await asyncio.wait_for(entered.wait(), 10)
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
            release.set()
            await app.handle("run-held-2").result(timeout=10)
    finally:
        http_server.shutdown()
        thread.join(5)
    assert response.status_code == 200
    text = response.text
    assert "run-held" not in text  # no run ids in labels
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["garrison_runs_started"].type == "counter"
    assert families["garrison_step_duration_seconds"].type == "histogram"
    assert families["garrison_queue_wait_seconds"].type == "histogram"
    assert families["garrison_gen_ai_client_token_usage"].type == "histogram"
    assert families["garrison_breaker_state"].type == "gauge"
    depth = {s.labels["queue"]: s.value for s in families["garrison_queue_depth"].samples}
    assert depth == {"default": 0, "slow-lane": 1}  # the second run waits in its queue
    [started] = [s for s in families["garrison_runs_started"].samples
                 if s.name == "garrison_runs_started_total"]
    assert started.labels == {"workflow": "held"} and started.value == 1
    assert all(set(s.labels) <= {"workflow", "step", "status", "queue", "le"}
               for f in families.values() for s in f.samples if s.name.startswith("garrison_"))


class _Receiver(BaseHTTPRequestHandler):
    bodies: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:  # http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        self.bodies.append((self.path, self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_spans_export_over_otlp_http_to_a_local_receiver(tmp_path: Path) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.bodies = []
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    provider = TracerProvider(resource=Resource.create({"service.name": "shop-worker"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=f"http://127.0.0.1:{receiver.server_port}/v1/traces")))
    try:
        app = Garrison(f"sqlite:///{tmp_path}/g.db")

        @app.step(name="ship")
        async def ship() -> str:
            return "shipped"

        @app.workflow(name="fulfil")
        async def fulfil(ctx: Context) -> str:
            return await ship()

        instrument(app, tracer_provider=provider)
        async with app:
            await (await app.start(fulfil, run_id="f")).result(timeout=10)
        await asyncio.to_thread(provider.force_flush)
    finally:
        provider.shutdown()
        receiver.shutdown()
        thread.join(5)
    assert _Receiver.bodies and {path for path, _ in _Receiver.bodies} == {"/v1/traces"}
    names, services = set(), set()
    for _, body in _Receiver.bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes
                         if a.key == "service.name"}
            for scope in resource_spans.scope_spans:
                assert scope.scope.name == "garrison"
                names |= {span.name for span in scope.spans}
    assert services == {"shop-worker"}
    assert names == {"start_workflow fulfil", "invoke_workflow fulfil", "step ship"}


def test_without_instrument_no_opentelemetry_is_imported_and_no_hook_runs(
        tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        from garrison import Context, Garrison
        from garrison.agents import Agent, ScriptedModel, tool
        import garrison.observability  # the logging half needs no OpenTelemetry

        @tool
        def add(a: int, b: int) -> int:
            '''Add.

            Args:
                a: one.
                b: two.
            '''
            return a + b

        async def main() -> None:
            app = Garrison("sqlite:///{tmp_path}/g.db")

            @app.step()
            async def work() -> int:
                return 1

            @app.workflow()
            async def flow(ctx: Context) -> int:
                return await work()

            agent = Agent("a", model=ScriptedModel([{{"name": "add", "arguments": {{"a": 1,
                "b": 2}}}}, "3"]), tools=[add])
            async with app:
                assert await (await app.start(flow)).result() == 1
                assert (await agent.run(app, "1+2?")).output == "3"
                assert app.worker is not None and not app.worker.hooks
                run = await app.store.get_run((await app.start(flow, run_id="x")).run_id)
                assert run is not None and run.trace_context is None
            loaded = sorted(m for m in sys.modules
                            if m.startswith(("opentelemetry", "prometheus_client")))
            print("loaded:", loaded)

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout, done.stdout


async def _scrape_openmetrics(registry: Any) -> dict[str, Any]:
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as openmetrics_families,
    )
    http_server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"http://127.0.0.1:{http_server.server_port}/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    finally:
        http_server.shutdown()
        thread.join(5)
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    return {f.name: f for f in openmetrics_families(response.text)}


def _exemplars(family: Any, **labels: str) -> list[Any]:
    return [s.exemplar for s in family.samples if s.name.endswith("_bucket")
            and s.exemplar is not None
            and all(s.labels.get(k) == v for k, v in labels.items())]


async def test_model_call_and_failed_step_buckets_carry_their_trace_as_exemplar(
        tmp_path: Path, server: LLMServer, telemetry: Telemetry) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    failures = iter([True, False])

    @app.step(name="charge", retry=Retry(max_attempts=2, base=0.0, cap=0.0))
    async def charge() -> None:
        if next(failures):
            raise ConnectionError("flaky")

    @app.workflow(name="pay")
    async def pay(ctx: Context) -> None:
        await charge()

    agent = Agent("greeter", model=OpenAIModel("gpt-test", base_url=server.openai_base_url,
                                              api_key="sk-test"))
    instrumentation = telemetry.attach(app)
    async with app:
        await (await app.start(pay, run_id="p")).result(timeout=10)
        await agent.run(app, "hello", run_id="a")
    families = await _scrape_openmetrics(instrumentation.registry)

    def trace_of(span_name: str) -> str:
        return f"{telemetry.one(span_name).context.trace_id:032x}"  # type: ignore[union-attr]

    [call] = _exemplars(families["garrison_gen_ai_client_operation_duration_seconds"])
    assert call.labels["trace_id"] == trace_of("invoke_agent greeter")
    span_ids = {f"{s.context.span_id:016x}" for s in telemetry.spans()}  # type: ignore[union-attr]
    assert call.labels["span_id"] in span_ids  # a span that was exported
    tokens = _exemplars(families["garrison_gen_ai_client_token_usage"])
    assert {e.labels["trace_id"] for e in tokens} == {trace_of("invoke_agent greeter")}
    assert len(tokens) == 2  # input and output, each in its bucket
    steps = families["garrison_step_duration_seconds"]
    [retried] = _exemplars(steps, step="charge", status="retried")
    assert retried.labels["trace_id"] == trace_of("invoke_workflow pay")
    assert _exemplars(steps, status="completed") == []  # quick successes carry none


async def test_no_exemplar_for_a_trace_sampled_out(tmp_path: Path, server: LLMServer) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    agent = Agent("greeter", model=OpenAIModel("gpt-test", base_url=server.openai_base_url,
                                              api_key="sk-test"))
    provider = TracerProvider(sampler=ALWAYS_OFF)
    instrumentation = instrument(app, tracer_provider=provider)
    async with app:
        await agent.run(app, "hello", run_id="a")
    families = await _scrape_openmetrics(instrumentation.registry)

    durations = families["garrison_gen_ai_client_operation_duration_seconds"]
    assert sum(s.value for s in durations.samples if s.name.endswith("_count")) == 1
    assert _exemplars(durations) == []  # it would lead to a trace nobody recorded
    provider.shutdown()
