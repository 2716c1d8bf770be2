"""The cost of telemetry: W1 and W2 with tracing and metrics on, off, and instrumented
with no-op providers, alternated round after round in one process.

    python benchmarks/observability_overhead.py [--rounds 7] [--json] [--gc-threshold N]

- W1: one workflow of 500 sequential no-op steps (ms/step, lower is better).
- W2: 200 workflows x 10 steps of `asyncio.sleep(0.005)`, started at once (steps/s).
- For both, the process's CPU time per step (µs, all threads): telemetry's cost is CPU
  work, and CPU time moves less than wall time on this shared machine (a stalled disk
  or a busy neighbour stretch the wall clock of every mode alike, but not evenly).

Modes: `off` (no `instrument`: the engine's hook-less path), `off-again` (a second
app exactly like `off`: its "overhead" is this harness's own noise, the smallest
difference a run can tell apart), `noop` (`instrument` with
OpenTelemetry's no-op tracer and meter providers: Garrison's hooks and the Prometheus
registry still run), `on` (SDK providers: spans to an in-memory exporter through a
BatchSpanProcessor, as in production; metrics to an in-memory reader), `on-simple`
(the same through a SimpleSpanProcessor: each span exported as it ends, as in tests)
and `on-notable` (as `on`, with `step_spans="notable"`: no span for a quick successful
step, which all of W1's and W2's steps are); `notable-prom` (as `on-notable`, with
OpenTelemetry's no-op meter: metrics through Prometheus only, Garrison's own tallies,
and no OpenTelemetry histogram record a step); `notable-sampled` (as `on-notable`, with
head sampling: `ParentBased(TraceIdRatioBased(0.1))`, one run in ten traced, the
sampler production tracing at this rate usually runs; every metric still recorded).
Each mode has its own app and SQLite file (the hooks are per app); the apps stay open
for the whole run, so their idle workers cost all modes alike.
Targets (issue 8): on <= 10 %, off <= 1 %.

"off" has nothing left to compare with in one process: its cost is the hook-less path
itself, an empty loop per run start and, in the agents, `annotate()` returning at once,
timed here per call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable, Coroutine
from typing import Any

import opentelemetry.sdk
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NoOpTracerProvider

from garrison import Context, Garrison, __version__
from garrison.engine import annotate
from garrison.observability import instrument

W1_STEPS = 500
W2_RUNS, W2_STEPS = 200, 10
MODES = ("off", "off-again", "noop", "on", "on-simple", "on-notable", "notable-prom",
         "notable-sampled")

Flow = Callable[..., Coroutine[Any, Any, Any]]


def build(url: str) -> tuple[Garrison, Flow, Flow]:
    app = Garrison(url)

    @app.step(name="noop")
    async def noop(i: int) -> int:
        return i

    @app.step(name="nap")
    async def nap(i: int) -> int:
        await asyncio.sleep(0.005)
        return i

    @app.workflow(name="w1")
    async def w1(ctx: Context) -> None:
        for i in range(W1_STEPS):
            await noop(i)

    @app.workflow(name="w2")
    async def w2(ctx: Context) -> None:
        for i in range(W2_STEPS):
            await nap(i)

    return app, w1, w2


async def measure(rounds: int, folder: str, gc_threshold: int | None = None
                  ) -> tuple[dict[str, list[float]], int]:
    apps: dict[str, tuple[Garrison, Flow, Flow]] = {}
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    simple_provider = TracerProvider()
    simple_provider.add_span_processor(SimpleSpanProcessor(exporter))
    sampled_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
    sampled_provider.add_span_processor(BatchSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    for mode in MODES:
        apps[mode] = build(f"sqlite:///{folder}/{mode}.db")
    instrument(apps["noop"][0], tracer_provider=NoOpTracerProvider(),
               meter_provider=NoOpMeterProvider())
    instrument(apps["on"][0], tracer_provider=tracer_provider, meter_provider=meter_provider)
    instrument(apps["on-simple"][0], tracer_provider=simple_provider,
               meter_provider=meter_provider)
    instrument(apps["on-notable"][0], tracer_provider=tracer_provider,
               meter_provider=meter_provider, step_spans="notable")
    instrument(apps["notable-prom"][0], tracer_provider=tracer_provider,
               meter_provider=NoOpMeterProvider(), step_spans="notable")
    instrument(apps["notable-sampled"][0], tracer_provider=sampled_provider,
               meter_provider=meter_provider, step_spans="notable")
    samples: dict[str, list[float]] = {f"{w}_{m}": [] for w in ("w1", "w2", "w1cpu", "w2cpu")
                                       for m in MODES}
    spans = 0
    for app, _, _ in apps.values():
        await app.open()
    try:
        for app, w1, _ in apps.values():  # warm up: WAL, caches, imports
            await (await app.start(w1)).result()
        if gc_threshold is not None:  # as a worker tuned for it would run (every mode)
            gc.freeze()
            gc.set_threshold(gc_threshold, 10, 10)
        for round_ in range(rounds):
            order = MODES if round_ % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                app, w1, w2 = apps[mode]
                began, cpu = time.perf_counter(), time.process_time()
                await (await app.start(w1)).result()
                samples[f"w1_{mode}"].append((time.perf_counter() - began) * 1000 / W1_STEPS)
                samples[f"w1cpu_{mode}"].append((time.process_time() - cpu) * 1e6 / W1_STEPS)
                began, cpu = time.perf_counter(), time.process_time()
                handles = [await app.start(w2) for _ in range(W2_RUNS)]
                for handle in handles:
                    await handle.result()
                samples[f"w2_{mode}"].append(W2_RUNS * W2_STEPS
                                             / (time.perf_counter() - began))
                samples[f"w2cpu_{mode}"].append((time.process_time() - cpu) * 1e6
                                                / (W2_RUNS * W2_STEPS))
            tracer_provider.force_flush()
            sampled_provider.force_flush()
            spans += len(exporter.get_finished_spans())
            exporter.clear()  # memory stays flat; the exporter's work is the same
    finally:
        for app, _, _ in apps.values():
            await app.close()
        tracer_provider.shutdown()
        simple_provider.shutdown()
        sampled_provider.shutdown()
        meter_provider.shutdown()
    return samples, spans


def sdk_floor_us() -> tuple[float, float, float]:
    """The OpenTelemetry SDK's own calls that telemetry as issue 8 asks for must make,
    timed alone (µs): one histogram record (two attributes) per step; per run, two spans
    (the enqueue's, four attributes; the execution's, seven, made current while it
    runs). Per step of W1 and W2, and a span's cost."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("floor")
    histogram = MeterProvider(metric_readers=[InMemoryMetricReader()]).get_meter(
        "floor").create_histogram("floor")
    step = {"garrison.step.name": "nap", "garrison.step.status": "completed"}
    enqueue = {"a": "1", "b": "w2", "c": "1", "d": "default"}
    execution: dict[str, str | int | bool] = {**enqueue, "e": "worker", "f": 0, "g": False}

    def run() -> None:
        tracer.start_span("start", attributes=enqueue).end()
        span = tracer.start_span("run", context=otel_context.Context(), attributes=execution)
        token = otel_context.attach(trace.set_span_in_context(span))
        otel_context.detach(token)
        span.end()

    run_us = min(timeit.repeat(run, number=2_000, repeat=5)) / 2_000 * 1e6
    exporter.clear()
    record_us = min(timeit.repeat(lambda: histogram.record(0.005, step), number=20_000,
                                  repeat=5)) / 20_000 * 1e6
    provider.shutdown()
    return record_us + run_us / W1_STEPS, record_us + run_us / W2_STEPS, run_us / 2


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f}  ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the samples as JSON")
    parser.add_argument("--gc-threshold", type=int, metavar="N",
                        help="after the warm-up, gc.freeze() and gc.set_threshold(N, 10, 10) "
                             "for every mode (see docs/observability.md, the collector)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        samples, spans = asyncio.run(measure(args.rounds, folder, args.gc_threshold))
    annotate_ns = min(timeit.repeat(lambda: annotate(x=1), number=100_000, repeat=5)) * 1e4
    floor_w1, floor_w2, span_us = sdk_floor_us()
    if args.json:
        print(json.dumps({"samples": samples, "spans": spans, "annotate_ns": annotate_ns,
                          "sdk_floor_us": {"w1": floor_w1, "w2": floor_w2, "span": span_us}}))
        return
    print(f"garrison {__version__}, opentelemetry-sdk {opentelemetry.sdk.version.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()}, {args.rounds} rounds"
          + ("" if args.gc_threshold is None else
             f", gc frozen after warm-up, gen0 threshold {args.gc_threshold}"))
    print(f"{'':28}{'median':>8}  (min-max)        overhead vs off: of the medians; "
          "per round (median, min..max)")
    for workload, unit, higher_better in (("w1", "ms/step", False), ("w2", "steps/s", True),
                                          ("w1cpu", "µs cpu", False), ("w2cpu", "µs cpu", False)):
        base = statistics.median(samples[f"{workload}_off"])
        for mode in MODES:
            values = samples[f"{workload}_{mode}"]
            median = statistics.median(values)
            overhead = (base / median - 1) if higher_better else (median / base - 1)
            # Each round ran every mode back to back: its own ratio to "off" cancels the
            # machine's slow swings, which the medians of all rounds do not.
            rounds = [((off / value) if higher_better else (value / off)) * 100 - 100
                      for off, value in zip(samples[f"{workload}_off"], values, strict=True)]
            note = "" if mode == "off" else (
                f"{overhead * 100:+6.1f} %;  {statistics.median(rounds):+6.1f} % "
                f"({min(rounds):+.0f}..{max(rounds):+.0f})")
            print(f"{workload[:2].upper()} {unit:8} {mode:15}   {summary(values)}   {note}")
    print(f"spans exported with telemetry on: {spans}")
    for workload, floor in (("w1", floor_w1), ("w2", floor_w2)):
        base = statistics.median(samples[f"{workload}cpu_off"])
        print(f"OpenTelemetry SDK floor, {workload.upper()}: {floor:.1f} µs a step "
              f"({floor / base * 100:.1f} % of off's CPU a step): its own calls, timed alone "
              f"(a histogram record a step, two spans a run; a span {span_us:.1f} µs)")
    print(f"annotate() outside a step / without hooks: {annotate_ns:.0f} ns a call")


if __name__ == "__main__":
    main()
