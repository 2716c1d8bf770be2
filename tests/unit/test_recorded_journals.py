"""Journals recorded by earlier versions replay to the same result, running nothing.

A change to position numbering, the codec or the journal's meaning breaks this test:
such a change needs a migration (and a deliberate re-recording, see fixtures/reference).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from garrison.store import RunStatus, SQLiteStore
from tests.fixtures import reference

JOURNALS = sorted((Path(__file__).parents[1] / "fixtures" / "journals").glob("*.json"))


@pytest.mark.parametrize("text", [p.read_text() for p in JOURNALS],
                         ids=[p.stem for p in JOURNALS])
async def test_recorded_journal_replays_to_the_recorded_result_without_running_steps(
    text: str, tmp_path: Path
) -> None:
    runs, steps = reference.load(json.loads(text))
    url = f"sqlite:///{tmp_path}/replay.db"
    store = SQLiteStore(url)
    await store.open()
    for run in runs:  # as if every run had been interrupted just before finishing
        await store.create_run(dataclasses.replace(run, status=RunStatus.RUNNING, result=None,
                                                   completed_at=None))
    await store.append_steps(steps)
    await store.close()

    reference.EXECUTIONS.clear()
    app = reference.build(url)
    async with app:
        for run in runs:
            replayed = await app.handle(run.run_id).result(timeout=10)
            assert run.result is not None
            assert replayed == json.loads(run.result), run.run_id
    assert reference.EXECUTIONS == {}, "a journaled step ran again"


@pytest.mark.parametrize("text", [p.read_text() for p in JOURNALS],
                         ids=[p.stem for p in JOURNALS])
async def test_recorded_journal_replays_with_app_replay_running_nothing_writing_nothing(
    text: str, tmp_path: Path
) -> None:
    runs, steps = reference.load(json.loads(text))
    url = f"sqlite:///{tmp_path}/replay.db"
    store = SQLiteStore(url)
    await store.open()
    for run in runs:  # as recorded: COMPLETED, with their results
        await store.create_run(run)
    await store.append_steps(steps)
    await store.close()
    before = (tmp_path / "replay.db").read_bytes()

    reference.EXECUTIONS.clear()
    app = reference.build(url)
    async with app:
        reports = [await app.replay(run.run_id) for run in runs]
    assert [(r.finished, r.entries) for r in reports] == [
        (True, len([s for s in steps if s.run_id == run.run_id])) for run in runs]
    assert reference.EXECUTIONS == {}, "a journaled step ran during replay"
    assert (tmp_path / "replay.db").read_bytes() == before
