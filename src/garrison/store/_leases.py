"""What a worker's store remembers of its leases: the runs it holds, at which fence.

Shared by the SQL stores. The database is the authority (owner, fence, lease_until on
each run); this book lets a store fence its writes without asking which runs are its
own, and tells the engine which leases a renewal found lost.
"""

from __future__ import annotations

import time
from dataclasses import replace

from garrison.errors import LeaseLostError, StoreError
from garrison.store._records import RunRecord

__all__ = ["LeaseBook"]


class LeaseBook:
    """Mixed into a store: `register_worker` fills it, claims add to it, ends remove."""

    safe_url: str
    worker_id: str | None = None
    lease_ttl_s: float = 10.0
    _clock_offset: float = 0.0

    def _init_leases(self) -> None:
        self.worker_id = None
        self.lease_ttl_s = 10.0
        self._held: dict[str, int] = {}  # run id -> the fence this worker claimed it with

    def _let_go(self, run_id: str, held: int | None) -> None:
        """Forget the hold on a run this worker parked or ended, unless it claimed the run
        again meanwhile (a due claim in the same batch as the park: a short retry wait).
        Forgetting that new claim would refuse the resumed run's writes as a lost lease."""
        if self._held.get(run_id) == held:
            self._held.pop(run_id, None)

    async def register_worker(self, worker_id: str, *, lease_ttl_s: float = 10.0) -> None:
        if lease_ttl_s <= 0:
            raise StoreError(f"register_worker(lease_ttl_s={lease_ttl_s}): must be > 0")
        self.worker_id = worker_id
        self.lease_ttl_s = lease_ttl_s

    def _wall(self) -> float:
        """Now on the store's clock (leases are compared on one clock)."""
        return time.time() + self._clock_offset

    def _lease_until(self) -> float:
        return self._wall() + self.lease_ttl_s

    def _require_worker(self) -> str:
        if self.worker_id is None:
            raise StoreError(f"store {self.safe_url}: claiming runs needs register_worker() "
                             "first")
        return self.worker_id

    def holds(self, run_id: str) -> bool:
        return run_id in self._held

    def held(self) -> list[str]:
        return list(self._held)

    def forget(self, run_id: str) -> None:
        self._held.pop(run_id, None)

    def _took(self, runs: list[RunRecord]) -> list[RunRecord]:
        for run in runs:
            self._held[run.run_id] = run.fence
        return runs

    def _leased(self, run: RunRecord) -> RunRecord:
        """A run created already claimed by this worker gets its lease."""
        if self.worker_id is None or run.owner != self.worker_id:
            return run
        return replace(run, lease_until=self._lease_until())

    def _created(self, run: RunRecord, created: bool) -> None:
        if created and self.worker_id is not None and run.owner == self.worker_id:
            self._held[run.run_id] = run.fence

    def _renewed(self, held: dict[str, int], renewed: set[str]) -> set[str]:
        """The runs a renewal found lost: not renewed, and still held at the same fence
        (a run that parked or ended meanwhile, or was claimed again, is not lost)."""
        lost = {r for r in set(held) - renewed if self._held.get(r) == held[r]}
        for run_id in lost:
            del self._held[run_id]
        return lost

    def _lost(self, run_id: str, detail: str) -> LeaseLostError:
        fence = self._held.pop(run_id, None)
        return LeaseLostError(
            f"store {self.safe_url}: worker {self.worker_id} no longer holds run {run_id} "
            f"({detail}; claimed at fence {fence}); its write was refused so that the run's "
            "new owner keeps an exact journal",
            run_id=run_id, worker=self.worker_id,
        )
