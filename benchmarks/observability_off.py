"""The cost of telemetry *off*: W1 and W2 without `instrument`, on this tree's engine and
on the engine before the observability seams (hooks for traces, `annotate`,
`record_event`, log fields), in alternating processes.

    python benchmarks/observability_off.py [--baseline f3dbad8] [--pairs 8] [--json]

The baseline revision is checked out into a temporary git worktree; each pair runs one
process per engine (which goes first alternates), each process measuring W1 (500
sequential no-op steps, ms/step) and W2 (200 runs x 10 steps of a 5 ms sleep, started at
once, steps/s) three times after a warm-up, on its own SQLite file. Target (issue 8):
telemetry off costs <= 1 %. On this shared 2-vCPU machine one process's figures swing
by tens of percent, so only the medians over many alternated pairs mean anything; the
spread is printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
W1_STEPS, W2_RUNS, W2_STEPS, REPEATS = 500, 200, 10, 3


async def measure(folder: str) -> dict[str, float]:
    """One process's medians (the engine is whichever `garrison` is on sys.path)."""
    from garrison import Context, Garrison

    app = Garrison(f"sqlite:///{folder}/off.db")

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

    w1_ms: list[float] = []
    w2_rate: list[float] = []
    async with app:
        await (await app.start(w1)).result()  # warm up
        for _ in range(REPEATS):
            began = time.perf_counter()
            await (await app.start(w1)).result()
            w1_ms.append((time.perf_counter() - began) * 1000 / W1_STEPS)
            began = time.perf_counter()
            handles = [await app.start(w2) for _ in range(W2_RUNS)]
            for handle in handles:
                await handle.result()
            w2_rate.append(W2_RUNS * W2_STEPS / (time.perf_counter() - began))
    return {"w1": statistics.median(w1_ms), "w2": statistics.median(w2_rate)}


def child() -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(asyncio.run(measure(folder))))


def run_one(source: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def imported_from(source: Path) -> str:
    done = subprocess.run([sys.executable, "-c", "import garrison; print(garrison.__file__)"],
                          env={**os.environ, "PYTHONPATH": str(source)}, check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="f3dbad8",
                        help="the revision before the observability seams (default f3dbad8)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the samples as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    with tempfile.TemporaryDirectory() as folder:
        worktree = Path(folder) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(worktree), args.baseline], check=True)
        try:
            sources = {"baseline": worktree / "src", "current": ROOT / "src"}
            for name, source in sources.items():  # each engine is the one measured
                found = imported_from(source)
                if not found.startswith(str(source)):
                    sys.exit(f"{name}: garrison imported from {found}, not {source}")
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
            for pair in range(args.pairs):
                order = ("baseline", "current") if pair % 2 == 0 else ("current", "baseline")
                for name in order:
                    samples[name].append(run_one(sources[name]))
                print(f"pair {pair + 1}/{args.pairs}: " + "  ".join(
                    f"{name} W1 {samples[name][-1]['w1']:.3f} ms/step "
                    f"W2 {samples[name][-1]['w2']:.0f} steps/s" for name in sources),
                    file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(worktree)], check=False)
    if args.json:
        print(json.dumps(samples))
        return
    print(f"baseline {args.baseline} vs current tree, {args.pairs} alternated pairs, "
          f"telemetry off (no instrument)")
    for workload, unit, higher_better in (("w1", "ms/step", False), ("w2", "steps/s", True)):
        medians = {}
        for name in ("baseline", "current"):
            values = [s[workload] for s in samples[name]]
            medians[name] = statistics.median(values)
            print(f"{workload.upper()} {unit:8} {name:9} {medians[name]:9.3f}  "
                  f"({min(values):.3f}-{max(values):.3f})")
        base, now = medians["baseline"], medians["current"]
        cost = (base / now - 1) if higher_better else (now / base - 1)
        ratios = [((b[workload] / c[workload]) if higher_better else (c[workload] / b[workload]))
                  - 1 for b, c in zip(samples["baseline"], samples["current"], strict=True)]
        print(f"{workload.upper()} cost of the current engine: {cost * 100:+.1f} % "
              f"(per pair: median {statistics.median(ratios) * 100:+.1f} %, "
              f"{min(ratios) * 100:+.1f} to {max(ratios) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
