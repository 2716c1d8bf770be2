"""Helpers shared by the peer benchmark scripts (run inside each peer's venv).

Only the standard library may be imported here: this module is loaded by the
``*_bench.py`` scripts, whose interpreter is the peer's virtualenv.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
from typing import Any

W1_STEPS = 500
W1_REPEATS = 5
W2_WORKFLOWS = 200
W2_STEPS = 10
W2_SLEEP_S = 0.005
W2_REPEATS = 3
W5_REPEATS = 5
_REAL_STDOUT = sys.stdout

_IMPORT_PROBE = """
import resource, time
t = time.perf_counter()
{statement}
elapsed = time.perf_counter() - t
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def parse_args(description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", required=True, choices=("w1", "w2", "w5"))
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    return parser.parse_args()


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
