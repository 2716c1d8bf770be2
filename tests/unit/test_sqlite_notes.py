"""What the SQLite store notes for its worker's `changes()` stays bounded: past the limit
(an app without a worker never reads them) the notes give way to "look at everything"."""

from __future__ import annotations

from pathlib import Path

import pytest

from garrison.store import _sqlite
from garrison.store._sqlite import SQLiteStore


async def test_notes_past_the_limit_become_look_at_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sqlite, "_MAX_NOTES", 3)
    store = SQLiteStore(f"sqlite:///{tmp_path}/g.db")
    await store.open()
    try:
        await store.changes()  # the first look reads the file's version
        store._forks_told.update({"f1", "f2"})
        store._bound_notes()
        within = await store.changes()
        store._forks_told.update({"f1", "f2"})
        store._streams_grown.update({"s1", "s2"})
        store._bound_notes()
        assert not store._forks_told and not store._streams_grown  # dropped at once
        past = await store.changes()
        after = await store.changes()
    finally:
        await store.close()
    assert (within.everything, within.events) == (False, {"f1", "f2"})
    assert (past.everything, past.events, past.streams) == (True, set(), set())
    assert not after  # back to normal
