"""The engine's secure-aggregation stages: keys, encrypted shares and reveals, one fenced write each.

What each stage checks and stores is in `secure.py`; this class only runs it inside the
engine's commit boundary and wakes the ticker when a round can be unmasked.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from fedsilo.aggregator import secure
from fedsilo.aggregator.core import EngineCore
from fedsilo.aggregator.errors import NotFound
from fedsilo.aggregator.lifecycle import RoundState
from fedsilo.aggregator.store import RoundRow
from fedsilo.api import models as m


class SecureStages(EngineCore):
    """The secure-aggregation stages (see the module docstring)."""

    def _secure_round(self, s: Session, job: str, number: int) -> RoundRow:
        self._job(s, job)
        rnd = s.get(RoundRow, (job, number))
        if rnd is None or rnd.secagg is None:
            raise NotFound(f"job {job!r} has no secure round {number}", "not_secure")
        return rnd

    def secagg_stage(self, job: str, number: int) -> str:
        with self.sessions() as s:
            rnd = self._secure_round(s, job, number)
            return "closed" if rnd.state == RoundState.CLOSED else secure.stage(rnd)

    def secagg_view(self, job: str, silo: str, number: int) -> m.SecAggView:
        with self.sessions() as s:
            return secure.view(s, self._secure_round(s, job, number), silo)

    def secagg_keys(self, job: str, silo: str, number: int, keys: m.SecAggKeys) -> None:
        with self._write(job) as tx:
            secure.post_keys(tx, self._secure_round(tx.s, job, number), silo, keys)

    def secagg_shares(self, job: str, silo: str, number: int, shares: m.SecAggShares) -> None:
        with self._write(job) as tx:
            secure.post_shares(tx, self._secure_round(tx.s, job, number), silo, shares)

    def secagg_reveal(self, job: str, silo: str, number: int, reveal: m.SecAggReveal) -> None:
        with self._write(job) as tx:
            if secure.post_reveal(tx, self._secure_round(tx.s, job, number), silo, reveal):
                tx.on_commit(self.wakeup.set)
