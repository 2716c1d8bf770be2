"""The cost of resilience policies on a step: W1 with and without them, in one run.

    python benchmarks/policy_overhead.py [--url sqlite:///...] [--rounds 7]

One workflow of 500 sequential no-op steps (W1), once with plain steps and once with
steps carrying `retry=Retry(...)`, `breaker=CircuitBreaker(...)` and
`bulkhead=Bulkhead(...)`, alternated round after round in one process so that the
machine's noise hits both alike. Prints ms/step (median, min-max) and the overhead in
per cent. Target (issue 6): <= 5 % on the embedded store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from garrison import Context, Garrison
from garrison.resilience import Bulkhead, CircuitBreaker, Retry

STEPS = 500


async def measure(url: str, rounds: int) -> dict[str, list[float]]:
    app = Garrison(url)

    @app.step(name="plain")
    async def plain(i: int) -> int:
        return i

    @app.step(name="guarded", retry=Retry(max_attempts=3),
              breaker=CircuitBreaker("bench", window=100, min_calls=10),
              bulkhead=Bulkhead("bench", max_concurrent=10))
    async def guarded(i: int) -> int:
        return i

    @app.workflow(name="w1-plain")
    async def w1_plain(ctx: Context) -> None:
        for i in range(STEPS):
            await plain(i)

    @app.workflow(name="w1-guarded")
    async def w1_guarded(ctx: Context) -> None:
        for i in range(STEPS):
            await guarded(i)

    samples: dict[str, list[float]] = {"plain": [], "guarded": [], "plain_cpu": [],
                                       "guarded_cpu": []}
    async with app:
        await (await app.start(w1_plain)).result()  # warm up: WAL, caches
        for _ in range(rounds):
            for name, flow in (("plain", w1_plain), ("guarded", w1_guarded)):
                began, cpu = time.perf_counter(), time.process_time()
                await (await app.start(flow)).result()
                samples[name].append((time.perf_counter() - began) * 1000 / STEPS)
                samples[f"{name}_cpu"].append((time.process_time() - cpu) * 1000 / STEPS)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="store URL (default: a temporary SQLite file)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="garrison-policies-") as folder:
        url = args.url or f"sqlite:///{folder}/bench.db"
        samples = asyncio.run(measure(url, args.rounds))
    plain, guarded, plain_cpu, guarded_cpu = (
        statistics.median(samples[k]) for k in ("plain", "guarded", "plain_cpu", "guarded_cpu"))
    for name, values in samples.items():
        print(f"W1 {name:12} {statistics.median(values):.4f} ms/step "
              f"({min(values):.4f}-{max(values):.4f})")
    added_cpu = guarded_cpu - plain_cpu
    print(f"overhead of retry + breaker + bulkhead: {100 * (guarded / plain - 1):+.1f} % of "
          f"wall time; CPU added {added_cpu * 1000:.1f} us/step = "
          f"{100 * added_cpu / plain:+.1f} % of a plain step's time")
    print(json.dumps({"workload": "w1-policies", "unit": "ms/step", **samples,
                      "overhead_pct": round(100 * (guarded / plain - 1), 2),
                      "cpu_added_pct": round(100 * added_cpu / plain, 2)}))


if __name__ == "__main__":
    main()
