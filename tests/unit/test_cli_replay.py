"""`garrison runs replay` and `garrison runs fork`, run as real processes over `--app`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from garrison import Context, Garrison

ROOT = Path(__file__).parents[2]
APP = "tests.unit._replay_cli_app:app"


async def _seed(url: str) -> list[str]:
    app = Garrison(url)

    @app.step(name="double")
    async def double(x: int) -> int:
        return x * 2

    @app.workflow(name="twice")
    async def twice(ctx: Context, x: int) -> int:
        return await double(x)

    async with app:
        handles = [await app.start(twice, x, run_id=f"run-{x}") for x in (1, 2)]
        for handle in handles:
            await handle.result(timeout=10)
    return [h.run_id for h in handles]


def _garrison(url: str, variant: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GARRISON_TEST_REPLAY_DB": url, "GARRISON_TEST_REPLAY_VARIANT": variant,
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "garrison", "runs", *args, "--app", APP],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


async def test_runs_replay_exits_0_when_the_code_agrees_and_1_when_it_diverges(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/g.db"
    ids = await _seed(url)

    same = _garrison(url, "same", "replay", *ids)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.splitlines() == [
        f"ok {run_id}: 1 entries, finished (twice v1)" for run_id in ids]

    changed = _garrison(url, "changed", "replay", *ids, "--json")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    lines = json.loads(changed.stdout)
    assert [(line["run_id"], line["status"], line["position"]) for line in lines] == [
        (run_id, "diverged", "2") for run_id in ids]
    assert "code called step 'double'" in lines[0]["message"]

    plain = _garrison(url, "changed", "replay", ids[0])
    assert plain.returncode == 1
    assert plain.stdout.startswith(f"diverged {ids[0]} at position 2: run {ids[0]} position 2")

    missing = _garrison(url, "same", "replay", "nope")
    assert missing.returncode == 2 and "error nope: no run 'nope'" in missing.stderr
    assert missing.stdout == ""  # errors on stderr; stdout is the report

    mixed = _garrison(url, "changed", "replay", ids[0], "nope")
    assert mixed.returncode == 1  # a divergence wins: the gate fails on it
    assert mixed.stdout.startswith(f"diverged {ids[0]}") and "nope" not in mixed.stdout
    assert "error nope: no run 'nope'" in mixed.stderr


async def test_runs_fork_prints_the_new_run_which_a_worker_continues(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/g.db"
    [first, _] = await _seed(url)

    forked = _garrison(url, "same", "fork", first, "--at", "0", "--args", "[21]",
                       "--run-id", "the-fork")
    assert forked.returncode == 0, forked.stdout + forked.stderr
    assert forked.stdout.strip() == "the-fork"

    worker = Garrison(url)

    @worker.step(name="double")
    async def double(x: int) -> int:
        return x * 2

    @worker.workflow(name="twice")
    async def twice(ctx: Context, x: int) -> int:
        return await double(x)

    async with worker:
        assert await worker.handle("the-fork").result(timeout=10) == 42
        record = await worker.handle("the-fork").record()
    assert (record.forked_from, record.forked_at) == (first, 0)

    past = _garrison(url, "same", "fork", first, "--at", "7", "--run-id", "past-the-end")
    assert past.returncode == 0 and past.stdout.strip() == "past-the-end"
    assert (f"note: {first}'s finished journal ends at position 1; the fork reuses all "
            "of it (1 entries; a pending timer or wait starts afresh)") in \
        " ".join(past.stderr.split())

    bad = _garrison(url, "same", "fork", first, "--at", "-1")
    assert bad.returncode == 2 and "'--at'" in bad.stderr and bad.stdout == ""
    not_json = _garrison(url, "same", "fork", first, "--at", "1", "--args", "[oops")
    assert not_json.returncode == 2 and "not JSON" in not_json.stderr
    assert not_json.stdout == ""  # `NEW=$(garrison runs fork ...)` gets no error text


async def test_runs_replay_children_walks_the_tree_and_names_the_child_that_diverges(
        tmp_path: Path) -> None:
    from tests.unit import _replay_cli_app as code

    url = f"sqlite:///{tmp_path}/g.db"
    app = Garrison(url)
    app.registry = code.app.registry
    async with app:
        assert await (await app.start(code.pair, 1, run_id="p")).result(timeout=10) == 6

    same = _garrison(url, "same", "replay", "p", "--children")
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.splitlines() == [
        "ok p: 4 entries, finished (pair v1)", "ok p/a: 1 entries, finished (twice v1)",
        "ok p/b: 1 entries, finished (twice v1)"]
    changed = _garrison(url, "changed", "replay", "p", "--children")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert changed.stdout.startswith("diverged p/a at position 2: ")
    assert _garrison(url, "changed", "replay", "p").returncode == 0  # the parent agrees


async def test_replay_json_stays_json_when_the_workflow_logs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/g.db"
    ids = await _seed(url)

    done = _garrison(url, "logs", "replay", *ids, "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    assert [line["status"] for line in json.loads(done.stdout)] == ["ok", "ok"]
    assert "twice.careful" in done.stderr  # logs go to stderr, warnings and worse
    assert "twice.start" not in done.stderr + done.stdout


def test_an_app_module_that_fails_to_import_is_a_setup_error_not_a_divergence(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/g.db"
    broken = _garrison(url, "broken", "replay", "run-1")
    assert broken.returncode == 2, broken.stdout + broken.stderr  # 1 means "diverged"
    assert "importing 'tests.unit._replay_cli_app' raised RuntimeError: the module's own bug" \
        in " ".join(broken.stderr.split())
    assert broken.stdout == "" and "Traceback" not in broken.stderr

    env = {**os.environ, "COLUMNS": "200"}
    missing = subprocess.run(
        [sys.executable, "-m", "garrison", "runs", "replay", "run-1", "--app",
         "tests.unit._replay_cli_app:nope"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60)
    assert missing.returncode == 2
    assert "module 'tests.unit._replay_cli_app' has no attribute 'nope'" in " ".join(
        missing.stderr.split())
