"""Garrison's agents layer beside agent frameworks, measured in one invocation (issue 7).

    python benchmarks/agents_bench.py                      # all peers, workloads a and b
    python benchmarks/agents_bench.py --peers langgraph --workloads a --repeats 3
    python benchmarks/agents_bench.py --quick              # fewer repetitions and runs

Starts one local OpenAI-compatible server (``garrison llm-server``, a process of its own
so it shares no GIL with what is measured) playing a fixed script, then runs every
framework against it, each in its own process: the raw ``openai`` client (the loop by
hand, the baseline), each peer in the virtualenv this script creates under
benchmarks/.venvs, and Garrison in this interpreter's environment. Repetitions are
interleaved: round k runs every framework once (in a rotated order), so a slow minute on
the shared 2-core machine hits all of them alike.

A   sequential runs: prompt -> tool call -> tool -> text answer (2 model calls, 1 tool).
    Figure: time per model call minus the raw client's, median and min-max over rounds.
    "Paired": the raw client's runs alternate with the framework's in the framework's own
    process (same moments of a noisy machine); "vs process": the openai process's figure
    of the same round. CPU added is paired too.
B   100 conversations at once, 3 messages each on one history (5 model calls, 2 tools).
    Figures: conversations/s and model calls/s, median and min-max over rounds.

The workloads live in peers/_agent_common.py. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.peers._agent_common import (  # noqa: E402
    A_CALLS_PER_RUN,
    A_RUNS,
    B_CALLS_PER_CONVERSATION,
    B_CONVERSATIONS,
    SERVER_SCRIPT,
)
from benchmarks.peers._venv import ensure_venv  # noqa: E402

RUN_TIMEOUT_S = 600
SERVER_READY_S = 60
GARRISON_IMPORT = "from garrison.agents import Agent, OpenAIModel, tool"


@dataclass(frozen=True)
class Framework:
    """One thing measured: a script, the virtualenv it runs in and its arguments."""

    name: str
    script: Path
    venv: str | None = None          # None: this interpreter (Garrison's environment)
    requirements: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    durable: str = ""
    fallback: Framework | None = None  # measured instead if this one cannot run here


_PYDANTIC_REQS = ("pydantic-ai-slim[openai,dbos]>=1.0", "dbos>=2.0")
_LANGGRAPH_REQS = ("langgraph>=1.0", "langchain-openai>=0.3", "langgraph-checkpoint-sqlite>=3.0",
                   "aiosqlite>=0.20")
_PYDANTIC_PLAIN = Framework(
    "pydantic-ai", HERE / "peers" / "agent_pydantic_dbos.py", "agent-pydantic-dbos",
    _PYDANTIC_REQS, ("--mode", "plain"), "no")
FRAMEWORKS: dict[str, Framework] = {f.name: f for f in (
    Framework("openai", HERE / "peers" / "agent_openai_raw.py", "agent-openai",
              ("openai>=1.40",), durable="no (baseline)"),
    Framework("openai-agents", HERE / "peers" / "agent_openai_agents.py", "agent-openai-agents",
              ("openai-agents>=0.2",), durable="no"),
    Framework("langgraph", HERE / "peers" / "agent_langgraph.py", "agent-langgraph",
              _LANGGRAPH_REQS, ("--mode", "sqlite"),
              "SQLite checkpoints, durability='sync'; resumed by hand"),
    Framework("langgraph-memory", HERE / "peers" / "agent_langgraph.py", "agent-langgraph",
              _LANGGRAPH_REQS, ("--mode", "memory"), "no"),
    Framework("pydantic-dbos", HERE / "peers" / "agent_pydantic_dbos.py", "agent-pydantic-dbos",
              _PYDANTIC_REQS, ("--mode", "dbos-agent"),
              "DBOS on SQLite (DBOSAgent): steps journaled, recovered on launch",
              fallback=_PYDANTIC_PLAIN),
    Framework("pydantic-dbos-cap", HERE / "peers" / "agent_pydantic_dbos.py",
              "agent-pydantic-dbos", _PYDANTIC_REQS, ("--mode", "dbos-capability"),
              "DBOS on SQLite (DBOSDurability in a workflow)", fallback=_PYDANTIC_PLAIN),
    _PYDANTIC_PLAIN,
    Framework("garrison", HERE / "agents_garrison.py", args=("--mode", "full"),
              durable="SQLite synchronous=FULL: each model and tool call journaled"),
    Framework("garrison-normal", HERE / "agents_garrison.py", args=("--mode", "normal"),
              durable="SQLite synchronous=NORMAL: survives a process crash, not power loss"),
)}
DEFAULT_PEERS = ("openai-agents", "langgraph", "pydantic-dbos", "garrison-normal")


@dataclass
class Series:
    """What one framework measured over the rounds of one workload."""

    framework: Framework
    records: list[dict[str, Any]] = field(default_factory=list)
    failure: str = ""

    def values(self, key: str = "samples") -> list[float]:
        return [float(r[key][0]) for r in self.records if key in r]


def log(message: str) -> None:
    print(f"[agents] {message}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}")


@contextlib.contextmanager
def llm_server(workdir: Path) -> Iterator[str]:
    """Run ``garrison llm-server`` on SERVER_SCRIPT in its own process; yield its base URL."""
    script = workdir / "server-script.json"
    script.write_text(json.dumps(SERVER_SCRIPT))
    cli = Path(sys.executable).with_name("garrison")
    cmd = ([str(cli)] if cli.exists() else [sys.executable, "-m", "garrison"])
    cmd += ["llm-server", "--script", str(script), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + SERVER_READY_S
        url = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{' '.join(cmd)} exited ({proc.wait()}) before listening")
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                url = found.group(1).rstrip("/")
                break
        if not url:
            raise RuntimeError(f"{' '.join(cmd)} did not print 'listening on' in "
                               f"{SERVER_READY_S} s")
        log(f"llm-server pid {proc.pid} at {url}")
        yield url if url.endswith("/v1") else f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@functools.cache
def python_for(framework: Framework) -> str:
    """The interpreter that runs ``framework``, its virtualenv built on first use."""
    if framework.venv is None:
        return sys.executable
    return str(ensure_venv(framework.venv, list(framework.requirements)))


def run_once(framework: Framework, workload: str, base_url: str, extra: list[str]
             ) -> dict[str, Any]:
    """One repetition of ``workload`` on ``framework`` in a fresh process and directory."""
    with tempfile.TemporaryDirectory(prefix=f"agents-{framework.name}-") as workdir:
        cmd = [python_for(framework), str(framework.script), "--workload", workload,
               "--base-url", base_url, "--workdir", workdir, "--repeats", "1",
               *framework.args, *extra]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"timed out after {RUN_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-12:]
        raise RuntimeError(f"exited with {done.returncode}: " + "\n".join(tail))
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError(f"printed no JSON line: {done.stdout[-500:]!r}")


def garrison_unavailable() -> str:
    """Why Garrison's agents layer cannot be measured here, or '' if it can."""
    done = subprocess.run([sys.executable, "-c", GARRISON_IMPORT], capture_output=True,
                          text=True, check=False)
    if done.returncode == 0:
        return ""
    return f"`{GARRISON_IMPORT}` failed: {done.stderr.strip().splitlines()[-1]}"


def measure_workload(workload: str, frameworks: list[Framework], base_url: str,
                     repeats: int, extra: list[str]) -> list[Series]:
    series = [Series(f) for f in frameworks]
    for round_no in range(repeats):
        shift = round_no % len(series)
        for item in series[shift:] + series[:shift]:
            if item.failure and (item.records or item.framework.fallback is None):
                continue
            log(f"{workload} round {round_no + 1}/{repeats}: {item.framework.name}")
            try:
                result = run_once(item.framework, workload, base_url, extra)
            except RuntimeError as exc:
                fallback = item.framework.fallback
                log(f"{item.framework.name} failed: {exc}")
                item.failure = f"{item.framework.name} could not run here: {exc}"
                if fallback is None or item.records:
                    continue  # the rounds it did run still count
                log(f"measuring {fallback.name} instead (not durable)")
                item.framework = fallback
                try:
                    result = run_once(fallback, workload, base_url, extra)
                except RuntimeError as again:
                    item.failure += f"; {fallback.name} too: {again}"
                    continue
            result["round"] = round_no
            item.records.append(result)
    return series


def number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.2f}"


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{number(statistics.median(values))} ({number(min(values))}-{number(max(values))})"


def added_per_call(item: Series, raw: Series, key: str = "samples") -> list[float]:
    """Per round: this framework's figure minus the raw client's of the same round."""
    base = {r["round"]: float(r[key][0]) for r in raw.records}
    return [round(float(r[key][0]) - base[r["round"]], 4)
            for r in item.records if r["round"] in base]


def versions(record: dict[str, Any]) -> str:
    parts = [str(record.get("version", "?"))]
    for key in ("openai", "dbos", "langchain_openai", "checkpoint_sqlite"):
        if key in record:
            parts.append(f"{key.replace('_', '-')} {record[key]}")
    return ", ".join(parts)


def table_a(series: list[Series]) -> list[dict[str, Any]]:
    raw = next(s for s in series if s.framework.name == "openai")
    mine = next((s for s in series if s.framework.name == "garrison" and s.records), None)
    mine_added = statistics.median(mine.values("paired_added_ms")) if mine else None
    runs = raw.records[0].get("runs", A_RUNS) if raw.records else A_RUNS
    print(f"\nA: added latency per model call ({runs} sequential runs x {A_CALLS_PER_RUN} "
          f"model calls per round; ms, median (min-max) over {len(raw.records)} rounds)")
    print("  paired: (median run - median raw-client run) / 2, the raw client's runs "
          "alternating with the framework's in its process;\n  vs process: ms/call minus "
          "the openai process's ms/call in the same round; CPU: paired, process CPU")
    print(f"  {'framework':<18}{'ms/call':<21}{'added, paired':<21}{'added vs process':<21}"
          f"{'CPU added':<20}{'/Garrison':<10}durable")
    rows: list[dict[str, Any]] = []
    for item in series:
        if not item.records:
            print(f"  {item.framework.name:<18}not measured: {item.failure}")
            rows.append({"framework": item.framework.name, "failure": item.failure})
            continue
        paired = item.values("paired_added_ms")
        cpu_added = item.values("paired_cpu_added_ms")
        vs_process = added_per_call(item, raw) if item is not raw else []
        ratio = "-"
        if mine_added and mine_added > 0 and paired and item is not mine:
            ratio = f"{statistics.median(paired) / mine_added:,.1f}x"
        print(f"  {item.framework.name:<18}{summary(item.values()):<21}"
              f"{summary(paired) if paired else 'baseline':<21}"
              f"{summary(vs_process) if vs_process else '-':<21}"
              f"{summary(cpu_added) if cpu_added else summary(item.values('cpu_ms_per_call')):<20}"
              f"{ratio:<10}{item.framework.durable}")
        rows.append({"framework": item.framework.name, "ms_per_call": item.values(),
                     "added_ms_paired": paired, "added_ms_vs_process": vs_process,
                     "cpu_ms_per_call": item.values("cpu_ms_per_call"),
                     "cpu_added_ms_paired": cpu_added, "ratio_to_garrison": ratio,
                     "durable": item.framework.durable, "failure": item.failure,
                     "records": item.records})
    return rows


def table_b(series: list[Series]) -> list[dict[str, Any]]:
    mine = next((s for s in series if s.framework.name == "garrison" and s.records), None)
    mine_conv = statistics.median(mine.values()) if mine else None
    print(f"\nB: throughput, {B_CONVERSATIONS} concurrent conversations x "
          f"{B_CALLS_PER_CONVERSATION} model calls (median (min-max) over rounds)")
    print(f"  {'framework':<18}{'conversations/s':<22}{'model calls/s':<22}{'CPU ms/call':<20}"
          f"{'Garrison is':<12}durable")
    rows: list[dict[str, Any]] = []
    for item in series:
        if not item.records:
            print(f"  {item.framework.name:<18}not measured: {item.failure}")
            rows.append({"framework": item.framework.name, "failure": item.failure})
            continue
        conv = item.values()
        ratio = "-"
        if mine_conv and item is not mine:
            ratio = f"{mine_conv / statistics.median(conv):,.1f}x"
        print(f"  {item.framework.name:<18}{summary(conv):<22}"
              f"{summary(item.values('model_calls_per_s')):<22}"
              f"{summary(item.values('cpu_ms_per_call')):<20}{ratio:<12}"
              f"{item.framework.durable}")
        rows.append({"framework": item.framework.name, "conversations_per_s": conv,
                     "model_calls_per_s": item.values("model_calls_per_s"),
                     "cpu_ms_per_call": item.values("cpu_ms_per_call"),
                     "garrison_is": ratio, "durable": item.framework.durable,
                     "failure": item.failure, "records": item.records})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma-separated, of: {', '.join(sorted(FRAMEWORKS))} "
                             f"(default {','.join(DEFAULT_PEERS)}; openai and garrison "
                             "always run)")
    parser.add_argument("--workloads", default="a,b", help="comma-separated: a,b")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds per workload (default 5; --quick 3)")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, 10 runs per round in A")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    workloads = [w for w in args.workloads.split(",") if w]
    if any(w not in ("a", "b") for w in workloads):
        parser.error("--workloads takes a and/or b")
    peers = [p for p in args.peers.split(",") if p and p not in ("openai", "garrison")]
    unknown = [n for n in peers if n not in FRAMEWORKS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(FRAMEWORKS)}")
    frameworks = [FRAMEWORKS["openai"], *(FRAMEWORKS[n] for n in peers
                                          if not n.startswith("garrison"))]
    unavailable = garrison_unavailable()
    if unavailable:
        log(f"garrison not measured: {unavailable}")
    else:
        frameworks.append(FRAMEWORKS["garrison"])
        frameworks += [FRAMEWORKS[n] for n in peers if n.startswith("garrison")]
    for framework in frameworks:  # build every virtualenv before anything is timed
        python_for(framework)
    extra_a = ["--runs", "10"] if args.quick else []

    print(f"machine: {machine()}")
    print(f"date: {datetime.date.today().isoformat()}; server: garrison llm-server "
          f"(own process); rounds: {repeats}")
    tables: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="agents-bench-"))
        base_url = stack.enter_context(llm_server(Path(tmp)))
        for workload in workloads:
            series = measure_workload(workload, frameworks, base_url, repeats,
                                      extra_a if workload == "a" else [])
            tables[workload] = table_a(series) if workload == "a" else table_b(series)
            if workload == workloads[-1]:
                print("\nversions:")
                for item in series:
                    if item.records:
                        print(f"  {item.framework.name:<18}{versions(item.records[-1])}")
    if unavailable:
        print(f"\ngarrison: not measured: {unavailable}")
    print(json.dumps({"benchmark": "agents", "date": datetime.date.today().isoformat(),
                      "machine": machine(), "rounds": repeats, "quick": args.quick,
                      "garrison_unavailable": unavailable or None, "tables": tables}))


if __name__ == "__main__":
    main()
