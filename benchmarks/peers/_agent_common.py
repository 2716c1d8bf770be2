"""Workloads of the agents benchmark (issue 7), shared by every framework's script.

Only the standard library may be imported here: the ``agent_*.py`` scripts load this
module inside each framework's own virtualenv, and ``benchmarks/agents_garrison.py``
inside Garrison's.

A   one conversation at a time: user prompt -> the model asks for ``lookup_order`` ->
    the tool returns a small dict -> the model answers in text. Two model calls and one
    tool call per run; the figure is wall time per model call.
B   100 conversations at once, each three user messages in sequence on one history:
    tool call + answer, tool call + answer, answer. Five model calls and two tool calls
    per conversation; the figures are conversations/s and model calls/s.

Every framework talks to the same local OpenAI-compatible server (``garrison
llm-server``, its own process) playing ``SERVER_SCRIPT``: the model's answers are
fixed, so the figures measure what each framework adds around a call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

MODEL = "bench-model"
API_KEY = "test"
INSTRUCTIONS = "You help with orders. Use lookup_order to find an order's status."
TOOL_NAME = "lookup_order"
TOOL_DESCRIPTION = "Look up an order by its id."

A_PROMPT = "where is order 7?"
A_CALLS_PER_RUN = 2
A_RUNS = 30          # timed runs per repetition (60 model calls)
A_WARMUP_RUNS = 5    # untimed, first: connection set-up, lazy imports, a fresh WAL

B_MESSAGES = ("where is order 7?", "and order 8?", "thanks, that is all")
B_CONVERSATIONS = 100
B_CALLS_PER_CONVERSATION = 5
B_TOOLS_PER_CONVERSATION = 2
B_WARMUP_CONVERSATIONS = 10

TOOL_ANSWER = "Order 7 has shipped."
FINAL_ANSWER = "You're welcome."

# garrison.testing.LLMServer's script: first matching rule wins. A user message asks
# for the tool unless it says "thanks"; a tool result is answered in text.
SERVER_SCRIPT: dict[str, Any] = {
    "rules": [
        {"last_role": "tool", "content": TOOL_ANSWER},
        {"last_role": "user", "last_user_contains": "thanks", "content": FINAL_ANSWER},
        {"last_role": "user",
         "tool_calls": [{"name": TOOL_NAME, "arguments": {"order_id": "7"}}]},
    ],
    "default": {"content": "ok"},
}

_REAL_STDOUT = sys.stdout


def order_status(order_id: str) -> dict[str, str]:
    """The tool's body in every framework: a small dict, no I/O."""
    return {"order_id": order_id, "status": "shipped", "carrier": "DHL"}


def parse_args(description: str | None, modes: tuple[str, ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", required=True, choices=("a", "b"))
    parser.add_argument("--base-url", required=True,
                        help="the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions")
    parser.add_argument("--runs", type=int, default=A_RUNS, help="A: timed runs per repetition")
    parser.add_argument("--conversations", type=int, default=B_CONVERSATIONS,
                        help="B: concurrent conversations")
    if modes:
        parser.add_argument("--mode", choices=modes, default=modes[0])
    return parser.parse_args()


def quiet_stdout() -> None:
    """Send whatever a framework prints to stderr so stdout stays one JSON line."""
    sys.stdout = sys.stderr


def log(message: str) -> None:
    print(f"[agents-bench] {message}", file=sys.stderr, flush=True)


def emit(record: dict[str, Any]) -> None:
    _REAL_STDOUT.write(json.dumps(record) + "\n")
    _REAL_STDOUT.flush()


def check_answer(framework: str, got: object, expected: str) -> None:
    """Fail loudly if a framework did not run the loop the script plays."""
    if not isinstance(got, str) or expected not in got:
        raise SystemExit(f"{framework}: expected an answer containing {expected!r}, got {got!r}")


async def time_a(run: Callable[[str], Awaitable[None]], args: argparse.Namespace,
                 control: Callable[[str], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Workload A: ``run(run_id)`` does one two-call conversation; time ``args.runs`` of
    them per repetition, after ``A_WARMUP_RUNS`` untimed ones.

    With ``control`` (the same conversation on the raw ``openai`` client, in this process
    and loop) each timed run alternates with one control run, which order alternating
    too, so both see the same moment of a shared, noisy machine; ``paired_added_ms``
    is then (median run - median control run) / model calls per run.

    Per repetition: wall ms and process CPU ms per model call (totals over the runs
    divided by the calls) and the median single run, less sensitive to one stall."""
    for i in range(A_WARMUP_RUNS):
        await run(f"warm-{i}")
        if control is not None:
            await control(f"warm-{i}")
    out: dict[str, list[float]] = {k: [] for k in (
        "samples", "cpu_ms_per_call", "median_run_ms", "control_ms_per_call",
        "control_cpu_ms_per_call", "control_median_run_ms", "paired_added_ms",
        "paired_cpu_added_ms")}
    calls = args.runs * A_CALLS_PER_RUN
    for rep in range(args.repeats):
        gc.collect()
        wall_ms: list[float] = []
        cpu_ms: list[float] = []
        control_wall_ms: list[float] = []
        control_cpu_ms: list[float] = []
        for i in range(args.runs):
            pair = [(run, wall_ms, cpu_ms)]
            if control is not None:
                pair.append((control, control_wall_ms, control_cpu_ms))
                if i % 2:
                    pair.reverse()
            for fn, walls, cpus in pair:
                cpu0 = time.process_time()
                started = time.perf_counter()
                await fn(f"r{rep}-{i}")
                walls.append((time.perf_counter() - started) * 1000)
                cpus.append((time.process_time() - cpu0) * 1000)
        out["samples"].append(round(sum(wall_ms) / calls, 4))
        out["cpu_ms_per_call"].append(round(sum(cpu_ms) / calls, 4))
        out["median_run_ms"].append(round(statistics.median(wall_ms), 3))
        if control is not None:
            out["control_ms_per_call"].append(round(sum(control_wall_ms) / calls, 4))
            out["control_cpu_ms_per_call"].append(round(sum(control_cpu_ms) / calls, 4))
            out["control_median_run_ms"].append(round(statistics.median(control_wall_ms), 3))
            out["paired_added_ms"].append(round(
                (statistics.median(wall_ms) - statistics.median(control_wall_ms))
                / A_CALLS_PER_RUN, 4))
            out["paired_cpu_added_ms"].append(round(
                (sum(cpu_ms) - sum(control_cpu_ms)) / calls, 4))
    result: dict[str, Any] = {"unit": "ms/model call", **{k: v for k, v in out.items() if v},
                              "runs": args.runs, "model_calls": calls}
    return result


async def time_b(conversation: Callable[[str], Awaitable[None]], args: argparse.Namespace
                 ) -> dict[str, Any]:
    """Workload B: ``conversation(conv_id)`` sends the three messages of ``B_MESSAGES``
    on one history; ``args.conversations`` run at once per repetition, after
    ``B_WARMUP_CONVERSATIONS`` untimed ones (also at once)."""
    await asyncio.gather(*(conversation(f"warm-{i}") for i in range(B_WARMUP_CONVERSATIONS)))
    conv_per_s: list[float] = []
    calls_per_s: list[float] = []
    cpu_ms_per_call: list[float] = []
    for rep in range(args.repeats):
        gc.collect()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(f"c{rep}-{i}") for i in range(args.conversations)))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        calls = args.conversations * B_CALLS_PER_CONVERSATION
        conv_per_s.append(round(args.conversations / wall, 2))
        calls_per_s.append(round(calls / wall, 1))
        cpu_ms_per_call.append(round(cpu * 1000 / calls, 3))
    return {"unit": "conversations/s", "samples": conv_per_s,
            "model_calls_per_s": calls_per_s, "cpu_ms_per_call": cpu_ms_per_call,
            "conversations": args.conversations,
            "model_calls": args.conversations * B_CALLS_PER_CONVERSATION}


async def measure(args: argparse.Namespace,
                  run_a: Callable[[str], Awaitable[None]],
                  conversation_b: Callable[[str], Awaitable[None]],
                  control_a: Callable[[str], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Time the workload ``args`` names; call from inside the framework's set-up.
    ``control_a``: workload A on the raw client, alternated with ``run_a``."""
    if args.workload == "a":
        return await time_a(run_a, args, control_a)
    return await time_b(conversation_b, args)


def record(framework: str, version: str, args: argparse.Namespace, result: dict[str, Any],
           **extra: Any) -> dict[str, Any]:
    return {"peer": framework, "version": version, "workload": args.workload, **result, **extra}
