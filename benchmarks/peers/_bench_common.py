"""Helpers shared by the peer benchmark scripts (run inside each peer's venv).

Only the standard library may be imported here: this module is loaded by the
``*_bench.py`` scripts, whose interpreter is the peer's virtualenv.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

W1_STEPS = 500
W1_REPEATS = 5
W2_WORKFLOWS = 200
W2_STEPS = 10
W2_SLEEP_S = 0.005
W2_REPEATS = 3
W3_STEPS = 20
W3_KILL_AT = 10
W3_SLEEP_S = 0.01
W3_REPEATS = 3
W3_WORKFLOW_ID = "w3"
W3_CHILD_MAX_S = 300
W5_REPEATS = 5
SERVER_MAX_S = 900
SERVER_READY_S = 120
_REAL_STDOUT = sys.stdout
_NETNS_ENV = "GARRISON_PEER_NETNS"
_PR_SET_PDEATHSIG = 1

_IMPORT_PROBE = """
import resource, time
t = time.perf_counter()
{statement}
elapsed = time.perf_counter() - t
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def parse_args(description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", required=True, choices=("w1", "w2", "w3", "w5"))
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    # W3 only: this run is one of the child processes; a JSON object (see run_w3).
    parser.add_argument("--w3-child", type=json.loads, default=None, help=argparse.SUPPRESS)
    # W1/W2 on PostgreSQL instead of SQLite (peers that support it: dbos, langgraph).
    parser.add_argument("--pg-url", default=None,
                        help="PostgreSQL database URL (libpq form); default: SQLite in --workdir")
    parser.add_argument("--pg-schema", default=None,
                        help="with --pg-url: the schema to keep the engine's tables in")
    args = parser.parse_args()
    if args.pg_url is not None and (args.pg_schema is None or args.workload not in ("w1", "w2")):
        parser.error("--pg-url takes --pg-schema, for --workload w1 or w2")
    return args


def pg_search_path_url(url: str, schema: str) -> str:
    """`url` whose connections use `schema` first (for engines that take no schema)."""
    from urllib.parse import quote

    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_import(statement: str) -> dict[str, Any]:
    """W5: time ``statement`` in fresh interpreters; one unrecorded warm-up run."""
    code = _IMPORT_PROBE.format(statement=statement)
    times_ms: list[float] = []
    rss_mib: list[float] = []
    for attempt in range(W5_REPEATS + 1):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        if attempt == 0:
            continue
        times_ms.append(round(float(out[0]) * 1000, 2))
        rss_mib.append(round(int(out[1]) / 1024, 1))
    return {"unit": "ms", "samples": times_ms, "rss_mib": rss_mib, "import": statement}


def emit(peer: str, version: str, workload: str, result: dict[str, Any]) -> None:
    """Print the single JSON result line on the real stdout."""
    record = {"peer": peer, "version": version, "workload": workload, **result}
    _REAL_STDOUT.write(json.dumps(record) + "\n")
    _REAL_STDOUT.flush()


def quiet_stdout() -> None:
    """Send anything the framework prints to stderr so stdout stays one JSON line."""
    sys.stdout = sys.stderr


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def isolate_network() -> None:
    """Re-run this script in a new network namespace whose only interface is loopback.

    Servers started from here then cannot reach anything off the machine (Restate's
    server, for one, asks GitHub for its latest release at start and has no setting to
    stop it). Where namespaces are not available the script runs as it is.
    """
    if os.environ.get(_NETNS_ENV) == "1":
        log("running in a private network namespace (loopback only)")
        return
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        log("unshare or ip not found: running in the host network namespace")
        return
    lo_up = [unshare, "--net", "--", ip, "link", "set", "lo", "up"]
    if subprocess.run(lo_up, capture_output=True, timeout=30, check=False).returncode != 0:
        log("cannot create a network namespace: running in the host network namespace")
        return
    os.environ[_NETNS_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    script = f'"{ip}" link set lo up && exec "$0" "$@"'
    os.execv(unshare, [unshare, "--net", "--", "sh", "-c", script, sys.executable, *sys.argv])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM it when this script dies.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Server:
    """A server process bounded in time and stopped (TERM, then KILL) on exit.

    It runs under ``timeout`` (at most SERVER_MAX_S), in its own process group, gets
    SIGTERM if this script dies, and writes its output to ``log_path``.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log_path: pathlib.Path,
        env: dict[str, str] | None = None,
        cwd: pathlib.Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        bounded = ["timeout", "--kill-after=5", str(SERVER_MAX_S), *self.cmd]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                bounded,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float = SERVER_READY_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue


# -- W3: SIGKILL inside step 10 of 20, restart, time to the first resumed step ----------


class W3Log:
    """The W3 step's side effect: one ``<pid> <index> <time.time()>`` line per step run.

    A child opens it once (``W3Log.open``); in the "first" child the step of index
    ``W3_KILL_AT - 1`` (the 10th) SIGKILLs the process right after writing its line,
    before the engine can record the step's result.
    """

    fd: int | None = None
    kill: bool = False

    @classmethod
    def open(cls, path: str, kill: bool) -> None:
        cls.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        cls.kill = kill

    @classmethod
    def mark(cls, index: int) -> None:
        if cls.fd is None:
            raise RuntimeError("W3Log.open was not called in this process")
        os.write(cls.fd, f"{os.getpid()} {index} {time.time()}\n".encode())
        if cls.kill and index == W3_KILL_AT - 1:
            os.kill(os.getpid(), signal.SIGKILL)


def w3_child_cmd(workload_args: argparse.Namespace, spec: dict[str, Any]) -> list[str]:
    """The command line re-running this script as a W3 child described by ``spec``."""
    return [
        sys.executable,
        sys.argv[0],
        "--workload",
        "w3",
        "--workdir",
        str(workload_args.workdir),
        "--w3-child",
        json.dumps(spec),
    ]


def _run_child(cmd: list[str], log_path: pathlib.Path) -> int:
    """Run a W3 child to its end; killed (with its group) if it outlives W3_CHILD_MAX_S."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        return proc.wait(timeout=W3_CHILD_MAX_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"W3 child did not end in {W3_CHILD_MAX_S} s: {cmd}") from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def w3_repetition(
    args: argparse.Namespace, rep: int, spec: dict[str, Any]
) -> tuple[float, float, int]:
    """One W3 repetition: a "first" child SIGKILLed in step 10, then a "resume" child.

    ``spec`` carries whatever the engine's children need (ports, a database path);
    ``role`` and ``log`` are added here. Returns (s from spawning the resume child to
    its first step line, s to its exit, number of step indices logged more than once).
    """
    step_log = args.workdir / f"w3-{rep}.steps"
    child_log = args.workdir / f"w3-{rep}.children.log"
    first = _run_child(
        w3_child_cmd(args, {**spec, "role": "first", "log": str(step_log)}), child_log
    )
    if first != -signal.SIGKILL:
        raise RuntimeError(
            f"W3 first child exited with {first}, not SIGKILL:\n"
            f"{child_log.read_text(errors='replace')[-3000:]}"
        )
    started = time.time()
    resumed = _run_child(
        w3_child_cmd(args, {**spec, "role": "resume", "log": str(step_log)}), child_log
    )
    finished = time.time()
    if resumed != 0:
        raise RuntimeError(
            f"W3 resume child exited with {resumed}:\n"
            f"{child_log.read_text(errors='replace')[-3000:]}"
        )
    rows = [line.split() for line in step_log.read_text().splitlines()]
    pids = list(dict.fromkeys(row[0] for row in rows))
    steps = [int(row[1]) for row in rows]
    if len(pids) != 2 or sorted(set(steps)) != list(range(W3_STEPS)):
        raise RuntimeError(f"W3 step log is not two processes covering every step: {rows}")
    first_resumed = min(float(row[2]) for row in rows if row[0] == pids[-1])
    twice = sum(1 for index in set(steps) if steps.count(index) > 1)
    log(f"w3 repetition {rep}: steps logged {steps}")
    return round(first_resumed - started, 4), round(finished - started, 4), twice


def w3_result(
    samples: list[float], complete_s: list[float], twice: list[int], recovery: str
) -> dict[str, Any]:
    return {
        "unit": "s to first resumed step",
        "samples": samples,
        "complete_s": complete_s,
        "steps_run_twice": twice,
        "recovery": recovery,
    }
