"""Parsed job documents, found by revision: each revision is decoded and validated once.

`JobRow.document` loads only when read (a 1,000-silo spec is ~100 KB of JSON, and decoding
and validating it costs more than everything else a poll does), and every assignment of it
sets `JobRow.document_sha`. So hot paths read the small row and ask `of(row)`: only a
revision this process has not seen loads and parses the document. The digest names the
content, so one process-wide cache serves every store and engine without confusing them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fedsilo import strategies
from fedsilo.aggregator import views
from fedsilo.aggregator.store import JobRow
from fedsilo.spec import FederatedJob, SiloSpec, parse_job

KEEP = 64  # revisions kept: a few per job (in force, pending, the one before)


@dataclass
class Parsed:
    """One revision of a job document: the spec and its strategy's client hooks."""

    job: FederatedJob
    hooks: strategies.ClientConfig

    @cached_property
    def _redacted(self) -> list[SiloSpec]:
        return views.redacted_silos(self.job)

    @cached_property
    def _silos(self) -> dict[str, SiloSpec]:
        return {s.name: s for s in self.job.spec.silos}

    def silo(self, name: str) -> SiloSpec:
        """`spec.silo(name)` by lookup: every poll asks, and a linear search of 1,000 silos was a tenth of its CPU."""
        found = self._silos.get(name)
        return found if found is not None else self.job.spec.silo(name)  # unknown: the spec's own KeyError

    def silo_view(self, silo: str) -> FederatedJob:
        """What `silo` may read of the job (`views.silo_job`); the others' entries are made once per revision,
        so a thousand silos joining cost a thousand list copies, not a million entries."""
        return views.silo_job(self.job, silo, self._redacted)


_lock = threading.Lock()
_cache: OrderedDict[str, Parsed] = OrderedDict()


def parse(document: dict[str, Any]) -> Parsed:
    job = parse_job(document)
    return Parsed(job, strategies.create(job.spec.aggregation.strategy, job.spec.aggregation.params).client_config())


def of(row: JobRow) -> Parsed:
    """The parsed document in force for `row` (loads the document only for an unseen revision)."""
    with _lock:
        hit = _cache.get(row.document_sha)
        if hit is not None:
            _cache.move_to_end(row.document_sha)
            return hit
    parsed = parse(row.document)  # outside the lock: a slow parse never blocks other jobs' reads
    with _lock:
        _cache[row.document_sha] = parsed
        while len(_cache) > KEEP:
            _cache.popitem(last=False)
    return parsed


def job_of(row: JobRow) -> FederatedJob:
    return of(row).job
