"""Where telemetry's cost goes in W2: each hook timed in place, the garbage collector,
and the rest (the engine's own code running slower beside the SDK's).

    python benchmarks/observability_where.py [--rounds 7] [--step-spans notable|all]
                                             [--providers sdk|noop]

W2 (200 workflows x 10 steps of `asyncio.sleep(0.005)`) runs alternately without
telemetry (`off`) and with it (SDK tracer, batch processor to an in-memory exporter,
SDK meter to an in-memory reader; with `--providers noop`, OpenTelemetry's no-op tracer
and meter, as a worker exporting through Prometheus only). Every public method of `TracingHooks` and
`MetricsHooks` is wrapped to add up the wall time spent in it (perf_counter: the hooks
run on the loop thread and never block; the wrapper itself costs ~0.1 µs a call, part
of it counted); a garbage collection that runs inside a hook is counted as collection.
"The rest" is what is left of the process's extra CPU time: the engine's own code running
slower beside the SDK's (cold caches) and the span processor's export thread; it is
inferred, not measured. A hook's in-place cost is often 2-3 times its cost in a hot
loop: it runs between database commits, with cold caches.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.observability_overhead import W2_RUNS, W2_STEPS, build
from garrison.observability import instrument
from garrison.observability._metrics import MetricsHooks
from garrison.observability._tracing import TracingHooks

STEPS = W2_RUNS * W2_STEPS
_in_hooks: dict[str, float] = {}
_gc = {"total": 0.0, "began": 0.0}


def _timed(cls: type) -> None:
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or name == "flush" or not callable(method):
            continue  # flush: called from inside a hook (counted there) or at collection

        def wrapper(*args: Any, __method: Any = method, __key: str = f"{cls.__name__}.{name}",
                    **kwargs: Any) -> Any:
            began, collected = time.perf_counter(), _gc["total"]
            try:
                return __method(*args, **kwargs)
            finally:  # a collection inside the hook is counted as collection, not here
                _in_hooks[__key] = (_in_hooks.get(__key, 0.0) + time.perf_counter() - began
                                    - (_gc["total"] - collected))

        setattr(cls, name, functools.wraps(method)(wrapper))


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc["began"] = time.process_time()
    else:
        _gc["total"] += time.process_time() - _gc["began"]


async def measure(rounds: int, step_spans: str, providers: str, folder: str
                  ) -> dict[str, list[Any]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    apps = {mode: build(f"sqlite:///{folder}/{mode}.db") for mode in ("off", "on")}
    if providers == "noop":
        instrument(apps["on"][0], tracer_provider=NoOpTracerProvider(),
                   meter_provider=NoOpMeterProvider(), step_spans=step_spans)
    else:
        instrument(apps["on"][0], tracer_provider=tracer_provider,
                   meter_provider=meter_provider, step_spans=step_spans)
    samples: dict[str, list[Any]] = {"off": [], "on": []}
    for app, _, w2 in apps.values():
        await app.open()
        await (await app.start(w2)).result()
    try:
        for round_ in range(rounds):
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                app, _, w2 = apps[mode]
                _in_hooks.clear()
                gc_before, cpu = _gc["total"], time.process_time()
                handles = [await app.start(w2) for _ in range(W2_RUNS)]
                for handle in handles:
                    await handle.result()
                samples[mode].append(((time.process_time() - cpu) * 1e6 / STEPS,
                                      (_gc["total"] - gc_before) * 1e6 / STEPS,
                                      {k: v * 1e6 / STEPS for k, v in _in_hooks.items()}))
            exporter.clear()
    finally:
        for app, _, _ in apps.values():
            await app.close()
        tracer_provider.shutdown()
        meter_provider.shutdown()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--step-spans", choices=("notable", "all"), default="notable")
    parser.add_argument("--providers", choices=("sdk", "noop"), default="sdk")
    args = parser.parse_args()
    _timed(TracingHooks)
    _timed(MetricsHooks)
    gc.callbacks.append(_on_gc)
    with tempfile.TemporaryDirectory() as folder:
        samples = asyncio.run(measure(args.rounds, args.step_spans, args.providers,
                                             folder))
    cpu = {mode: statistics.median(s[0] for s in samples[mode]) for mode in samples}
    collected = {mode: statistics.median(s[1] for s in samples[mode]) for mode in samples}
    hooks = {key: statistics.median(s[2].get(key, 0.0) for s in samples["on"])
             for key in sorted({k for s in samples["on"] for k in s[2]})}
    in_hooks = sum(hooks.values())
    extra = cpu["on"] - cpu["off"]
    print(f"W2, {args.providers} providers, step_spans={args.step_spans!r}, "
          f"{args.rounds} rounds, medians, µs a step")
    print(f"CPU: off {cpu['off']:.1f}, on {cpu['on']:.1f}: +{extra:.1f} "
          f"(+{extra / cpu['off'] * 100:.0f} %)")
    print(f"  in the hooks           {in_hooks:6.1f}")
    for key, value in hooks.items():
        if value >= 0.05:
            print(f"    {key:34} {value:6.2f}")
    print(f"  garbage collection     {collected['on'] - collected['off']:+6.1f}  "
          f"(off {collected['off']:.1f}, on {collected['on']:.1f})")
    rest = extra - in_hooks - collected["on"] + collected["off"]
    print(f"  the rest               {rest:+6.1f}  (inferred: the engine's code beside the "
          "SDK's, the export thread, the wrappers)")


if __name__ == "__main__":
    main()
