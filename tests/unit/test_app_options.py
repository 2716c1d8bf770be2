"""`Garrison(...)` refuses options it cannot run with, naming the option and the fix,
before anything is opened."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from garrison import ConfigurationError, Garrison


@pytest.mark.parametrize(("option", "value", "says"), [
    ("lease_ttl_s", float("nan"), "lease_ttl_s=nan): a finite number of seconds > 0"),
    ("lease_ttl_s", float("inf"), "lease_ttl_s=inf): a finite number of seconds > 0"),
    ("poll_interval_s", 0, "poll_interval_s=0): a finite number of seconds > 0"),
    ("claim_interval_s", True, "claim_interval_s=True): a finite number of seconds > 0"),
    ("shutdown_grace_s", -1, "shutdown_grace_s=-1): a finite number of seconds >= 0"),
    ("sync_step_threads", 0, "sync_step_threads=0): a whole number >= 1"),
    ("sync_step_threads", 2.5, "sync_step_threads=2.5): a whole number >= 1"),
])
def test_a_bad_option_is_refused_naming_it(tmp_path: Path, option: str, value: Any,
                                           says: str) -> None:
    with pytest.raises(ConfigurationError, match="^Garrison\\(" + re.escape(says)):
        Garrison(f"sqlite:///{tmp_path}/g.db", **{option: value})
    assert not (tmp_path / "g.db").exists()


def test_an_empty_url_is_refused_not_read_as_the_default(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("", "  "):
        with pytest.raises(ConfigurationError, match="an empty store URL"):
            Garrison(url)
    assert list(tmp_path.iterdir()) == []


async def test_the_options_at_their_limits_are_accepted(tmp_path: Path) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db", sync_step_threads=1, shutdown_grace_s=0,
                   lease_ttl_s=0.5)
    async with app:
        assert app.worker is not None
