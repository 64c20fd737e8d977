"""The engine's background half: ticking closes rounds and enforces deadlines, then collects blobs.

`tick` runs in the ticker (app.py), never inside an uploader's request: per job, a read-only
look first (`_due`), then one fenced write that starts the job, expires a secure stage or a
deadline, and closes an aggregating round into the next global adapter (`_close_round`).
Update files a closed round no longer needs are deleted after its commit (`_collect`), and
`sweep` removes orphans of failed transactions.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedsilo import strategies
from fedsilo.adapters import State, from_bytes, to_bytes
from fedsilo.aggregator import budget, secure, specs, transitions
from fedsilo.aggregator.core import EngineCore
from fedsilo.aggregator.errors import Fenced
from fedsilo.aggregator.lifecycle import (
    Live,
    MaskedSum,
    Phase,
    RoundState,
    Tx,
    secure_weight,
    update_weight,
)
from fedsilo.aggregator.store import (
    JobRow,
    RoundRow,
    UpdateRow,
    VersionRow,
    aware,
)
from fedsilo.privacy import dp as privacy_dp
from fedsilo.privacy import secagg
from fedsilo.privacy.vectors import unflatten
from fedsilo.strategies import WeightedSum

log = logging.getLogger("fedsilo.aggregator")


class Ticking(EngineCore):
    """Closing rounds, deadlines and blob collection (see the module docstring)."""

    def _close_round(self, tx: Tx, row: JobRow, rnd: RoundRow) -> None:
        """Aggregate the round's committed updates into the next global adapter."""
        live = self._live_for(tx.s, row, with_acc=True)
        assert live.global_state is not None
        started = time.perf_counter()
        server_state: State = from_bytes(self.blobs.get(row.server_state_sha)) if row.server_state_sha else {}
        tx.dirty = True  # aggregate may consume the accumulator
        acc = live.acc
        if isinstance(acc, MaskedSum):  # remove the masks: the aggregator learns the sum, nothing else
            assert acc.ring is not None and live.schema is not None
            lay = secure.layout(live.schema, live.strategy.client_config())
            total = unflatten(secagg.decode(secure.unmask(tx.s, rnd, acc.ring)), lay)
            acc = WeightedSum(total=total, weight=acc.weight, count=acc.count)
        dp = live.job.spec.privacy.dp
        if isinstance(acc, WeightedSum) and dp is None:  # DP: a rescale would raise the sensitivity past C
            contributions = self._rank_contributions(tx.s, row, rnd, live)
            strategies.rescale_components(acc.total, contributions, live.job.spec.peft.r)
        if dp is not None and rnd.secagg is None:  # central DP: the aggregator adds the noise
            noise = privacy_dp.gaussian(acc.total, privacy_dp.central_std(dp.noise_multiplier, dp.clip_norm))
            for name, tensor in noise.items():
                acc.total[name].add_(tensor)
        result = live.strategy.aggregate(live.global_state, acc, server_state)
        data = to_bytes(result.state)
        digest = self.blobs.put(data)
        if result.server_state:
            row.server_state_sha = self.blobs.put(to_bytes(result.server_state))
        seconds = time.perf_counter() - started
        tx.s.add(VersionRow(job=row.name, version=rnd.number, sha256=digest, n_bytes=len(data), created_at=tx.now))
        rnd.state, rnd.closed_at, rnd.aggregation_seconds = RoundState.CLOSED, tx.now, seconds
        rnd.metrics = {**(rnd.metrics or {}), **{k: float(v) for k, v in result.metrics.items()}}
        if rnd.secagg is not None:
            rnd.secagg = {**rnd.secagg, "stage": "closed"}
        spent = budget.spend(tx, row, rnd, dp) if dp is not None else None
        row.version = rnd.number
        updates = list(
            tx.s.scalars(select(UpdateRow.sha256).where(UpdateRow.job == row.name, UpdateRow.round == rnd.number))
        )
        if rnd.number >= row.rounds:
            row.phase, row.finished_at = Phase.SUCCEEDED, tx.now
        elif dp is not None and budget.exhausted(tx, row, rnd, dp):
            pass  # stopped inside the privacy budget: `exhausted` finished the job and said why
        else:
            transitions.open_round(tx, row, rnd.number + 1, self.metrics)
        name, number, opened = row.name, rnd.number, aware(rnd.opened_at)

        def installed() -> None:
            if live is self._live.get(name):
                live.global_state, live.version, live.acc = result.state, number, None
            self.metrics.aggregation_duration.labels(name).observe(seconds)
            self.metrics.round_duration.labels(name).observe((tx.now - opened).total_seconds())  # type: ignore[operator]
            if spent is not None:
                self.metrics.privacy_epsilon.labels(name).set(spent)
            if "lora_truncation_error" in result.metrics:
                self.metrics.lora_truncation_error.labels(name).set(result.metrics["lora_truncation_error"])
            log.debug("job %s: round %d closed -> version %d (%.3fs aggregation)", name, number, number, seconds)

        tx.on_commit(installed)
        tx.on_commit(lambda: self._collect(updates))

    @staticmethod
    def _rank_contributions(s: Session, row: JobRow, rnd: RoundRow, live: Live) -> list[tuple[int, float]]:
        """(LoRA rank, fold weight) of every update folded into this round's sum."""
        spec = live.job.spec
        ranks = {silo.name: silo.rank or spec.peft.r for silo in spec.silos}
        out = []
        for u in s.scalars(select(UpdateRow).where(UpdateRow.job == row.name, UpdateRow.round == rnd.number)):
            if rnd.secagg is not None:
                weight = secure_weight(u.n_examples, live.job)
            else:
                staleness = rnd.number - 1 - (u.base_version if u.base_version is not None else rnd.number - 1)
                weight = update_weight(u.n_examples, staleness, spec.aggregation)
            out.append((ranks.get(u.silo, spec.peft.r), weight))
        return out

    @staticmethod
    def _needed(s: Session) -> set[str]:
        """Blobs a committed row still needs: versions, server state, updates of unclosed rounds.

        Update rows of closed rounds stay as history, but their files are no longer needed.
        """
        open_updates = select(UpdateRow.sha256).join(
            RoundRow, (RoundRow.job == UpdateRow.job) & (RoundRow.number == UpdateRow.round)
        )
        needed = set(s.scalars(open_updates.where(RoundRow.state != RoundState.CLOSED)))
        needed |= set(s.scalars(select(VersionRow.sha256)))
        needed |= {d for d in s.scalars(select(JobRow.server_state_sha)) if d}
        return needed

    def _collect(self, digests: list[str]) -> None:
        """After a round's close committed: delete its update files nothing else needs."""
        with self.sessions() as s:
            needed = self._needed(s)
        for digest in set(digests) - needed:
            self.blobs.delete(digest)

    def sweep(self, min_age_seconds: float = 600.0) -> int:
        """Remove blob files no committed row needs (orphans of failed transactions or crashes)."""
        with self.sessions() as s:
            needed = self._needed(s)
        removed = self.blobs.sweep(needed, min_age_seconds)
        if removed:
            log.info("swept %d unneeded blob file(s)", removed)
        return removed

    def tick(self) -> None:
        """Close ready rounds, enforce deadlines and start conditions; each job on its own."""
        for name in self.job_names():
            try:
                self._tick_job(name)
                self._fenced_logged.discard(name)
            except Fenced as exc:
                if name not in self._fenced_logged:
                    log.warning("%s", exc.detail)
                    self._fenced_logged.add(name)
            except Exception:
                log.exception("job %s: tick failed (other jobs go on)", name)

    def _due(self, name: str) -> bool:
        """A read-only look: does this job need a write now?"""
        with self.sessions() as s:
            row = self._job(s, name)
            if row.phase == Phase.PENDING:
                return row.version >= 0
            if row.phase != Phase.RUNNING:
                return False
            rnd = s.get(RoundRow, (name, row.current_round))
            if rnd is not None and rnd.secagg is not None:
                return rnd.state == RoundState.AGGREGATING or secure.due(rnd, self.clock())
            return rnd is not None and (
                rnd.state == RoundState.AGGREGATING
                or (rnd.state == RoundState.OPEN and self.clock() >= aware(rnd.deadline))  # type: ignore[operator]
            )

    def _tick_job(self, name: str) -> None:
        if not self._due(name):
            return
        with self._write(name) as tx:
            row = self._job(tx.s, name, lock=True)
            if row.phase == Phase.PENDING:
                transitions.maybe_start(tx, row, self.metrics)
            if row.phase != Phase.RUNNING:
                return
            rnd = tx.s.get(RoundRow, (name, row.current_round))
            if rnd is None or rnd.state == RoundState.CLOSED:
                return
            if rnd.state == RoundState.OPEN and rnd.secagg is not None:
                if not secure.due(rnd, tx.now):
                    return
                secure.expire(tx, row, rnd, specs.job_of(row).spec.aggregation.min_silos)
            elif rnd.state == RoundState.OPEN:
                if tx.now < aware(rnd.deadline):  # type: ignore[operator]
                    return
                transitions.deadline_passed(tx, row, rnd)
            if rnd.state == RoundState.AGGREGATING:
                self._close_round(tx, row, rnd)
