"""A fork made on PostgreSQL while a child it reuses is ending cannot miss that end.

The fork's transaction takes a share lock on the rows of the children it reuses, so a
child's ending transaction (which holds its row) either commits first, and the fork
reads the child as ended, or waits for the fork, and then sends the end to it too.
Here the ending transaction is held open by hand and the fork is seen waiting for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest

from garrison import RunStatus
from tests.integration.engine._fork_apps import build
from tests.integration.engine._fork_apps import wait_status as _status
from tests.pg import PG_URL, drop_schemas, fresh_postgres_url


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield fresh_postgres_url()
    drop_schemas()


async def test_postgres_a_fork_waits_for_a_reused_child_that_is_ending(pg_url: str) -> None:
    schema = pg_url.rsplit("schema=", 1)[1]
    app, _ = build(pg_url)
    async with app:
        parent = (await app.start("gated", "a")).run_id
        child = f"{parent}/1"
        await _status(app, child, RunStatus.WAITING)
        await _status(app, parent, RunStatus.WAITING)
        ending = await psycopg.AsyncConnection.connect(PG_URL)
        watcher = await psycopg.AsyncConnection.connect(PG_URL, autocommit=True)
        try:
            await ending.execute(f"SET search_path TO {schema}")
            await ending.execute(  # the child's row, held as its finish_run holds it
                "UPDATE runs SET updated_at = updated_at WHERE run_id = %s", (child,))
            making = asyncio.create_task(app.fork(parent, at_step=1))
            async with asyncio.timeout(10):
                while True:
                    blocked = await (await watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE %s = ANY(pg_blocking_pids(pid))",
                        (ending.info.backend_pid,))).fetchone()
                    if blocked is not None and blocked[0] > 0:
                        break
                    await asyncio.sleep(0.01)
            assert not making.done()  # the fork's transaction waits on the child's row
            await ending.commit()
            fork = await making
        finally:
            await ending.close()
            await watcher.close()
        await _status(app, fork.run_id, RunStatus.WAITING)
        await app.send(child, "go", "yes")
        assert await fork.result(timeout=10) == "yes-a"
        assert await app.handle(parent).result(timeout=10) == "yes-a"
