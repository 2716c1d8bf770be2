"""The engine over a failing store: fail closed, lose nothing, continue when it heals."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from garrison import Context, Garrison, RunStatus
from garrison.engine import _execution
from garrison.store import SQLiteStore, StepStatus


async def test_disk_full_mid_run_fails_closed_and_the_run_continues_once_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The journal write is tried once more only, then the run is dropped and resumed.
    monkeypatch.setattr(_execution, "_APPEND_RETRIES_S", (0.01,))
    store = SQLiteStore(f"sqlite:///{tmp_path}/g.db")
    app = Garrison(store=store)
    gate = asyncio.Event()
    holding = asyncio.Event()
    executions: list[int] = []

    @app.step()
    async def write(i: int) -> str:
        executions.append(i)
        if i == 2:
            holding.set()
            await gate.wait()
        return "x" * 2000  # a few pages per commit, so the cap bites

    @app.workflow(name="w")
    async def w(ctx: Context) -> int:
        for i in range(4):
            await write(i)
        return 4

    async with app:
        handle = await app.start(w, run_id="full")
        await holding.wait()  # step 2 is in flight, held by the gate
        conn = store._conn  # test seam: cap the file at its current size ("disk full")
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        gate.set()
        async with asyncio.timeout(5):  # the worker drops the run when its commit fails
            while app.worker is not None and "full" in app.worker.live:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        record = await handle.record()
        assert record.status is RunStatus.RUNNING  # not FAILED: the store failed, not the run
        journal = {e.position: e.status for e in await store.load_journal("full")}
        assert journal == {"1": StepStatus.COMPLETED, "2": StepStatus.COMPLETED}
        conn.execute(f"PRAGMA max_page_count = {pages * 1000}")  # space is back
        assert await handle.result(timeout=10) == 4
    # Step 3 (position 3) ran, could not be committed, and ran again after the retry.
    assert executions[:3] == [0, 1, 2] and executions.count(2) == 2 and executions[-1] == 3


async def test_a_short_outage_holds_the_step_result_and_retries_its_write(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/g.db")
    app = Garrison(store=store)
    gate = asyncio.Event()
    holding = asyncio.Event()
    executions: list[int] = []

    @app.step()
    async def write(i: int) -> str:
        executions.append(i)
        if i == 1:
            holding.set()
            await gate.wait()
        return "x" * 2000

    @app.workflow(name="w")
    async def w(ctx: Context) -> int:
        for i in range(3):
            await write(i)
        return 3

    async with app:
        handle = await app.start(w, run_id="blip")
        await holding.wait()
        conn = store._conn  # test seam: "disk full" for a moment
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        gate.set()
        await asyncio.sleep(0.5)  # the write fails and is tried again, result held
        assert app.worker is not None and "blip" in app.worker.live
        assert {e.position for e in await store.load_journal("blip")} == {"1"}
        conn.execute(f"PRAGMA max_page_count = {pages * 1000}")
        assert await handle.result(timeout=15) == 3
    assert executions == [0, 1, 2]  # step 1 ran once: its result waited for the disk


async def test_a_reader_holding_a_snapshot_does_not_block_the_writer(tmp_path: Path) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")

    @app.step()
    async def one() -> int:
        return 1

    @app.workflow(name="w")
    async def w(ctx: Context) -> int:
        return await one() + await one()

    async with app:
        await (await app.start(w)).result(timeout=5)
        reader = sqlite3.connect(tmp_path / "g.db", isolation_level=None)
        reader.execute("BEGIN")
        before = reader.execute("SELECT count(*) FROM runs").fetchone()[0]
        assert await (await app.start(w)).result(timeout=5) == 2
        assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == before  # snapshot
        reader.execute("COMMIT")
        reader.close()


async def test_synchronous_option_is_applied_to_the_connection(tmp_path: Path) -> None:
    for option, expected in (("", 2), ("?synchronous=NORMAL", 1)):
        store = SQLiteStore(f"sqlite:///{tmp_path}/s.db{option}")
        await store.open()
        try:
            assert store._conn is not None
            assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == expected
            assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            await store.close()
