"""A run that parks on a short retry wait can be claimed back, due, in the same commit
batch as its park. The worker must keep that new claim: forgetting it refused the
resumed run's next write as a lost lease, stalled the run for a lease TTL and ran the
attempt again (found by an agents test under a 429 storm)."""

from __future__ import annotations

import asyncio
from collections import Counter

from garrison import Context, Garrison
from garrison.resilience import Retry
from garrison.store import StepKind


async def test_a_run_claimed_back_while_parking_keeps_its_claim(db_url: str) -> None:
    executions: Counter[tuple[str, int]] = Counter()
    app = Garrison(db_url, lease_ttl_s=30.0)  # a lost claim would stall a run for 30 s

    @app.step(retry=Retry(max_attempts=6, base=0.01, cap=0.01, random=lambda: 0.5))
    async def flaky(key: str, n: int) -> int:
        executions[(key, n)] += 1
        await asyncio.sleep(0.001)
        if executions[(key, n)] <= 3:
            raise RuntimeError("not yet")
        return n

    @app.workflow()
    async def twice(ctx: Context, key: str) -> int:
        return await flaky(key, 1) + await flaky(key, 2)

    async with app:
        handles = [await app.start(twice, f"k{i}", run_id=f"r{i}") for i in range(40)]
        results = [await h.result(timeout=20) for h in handles]
        journals = {h.run_id: await app.store.load_journal(h.run_id) for h in handles}
    assert results == [3] * 40
    for run_id, journal in journals.items():
        steps = [e for e in journal if e.kind is StepKind.STEP]
        assert [e.attempts for e in steps] == [4, 4], run_id
    # Each attempt ran once: none was refused and made again after a takeover.
    assert set(executions.values()) == {4}
