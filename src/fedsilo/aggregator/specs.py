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
from dataclasses import dataclass, field
from typing import Any

from fedsilo import strategies
from fedsilo.aggregator import views
from fedsilo.aggregator.store import JobRow
from fedsilo.spec import FederatedJob, dump_job, parse_job

KEEP = 64  # revisions kept: a few per job (in force, pending, the one before)


@dataclass
class Parsed:
    """One revision of a job document: the spec, its strategy's client hooks, silo views on demand."""

    job: FederatedJob
    hooks: strategies.ClientConfig
    _views: dict[str, tuple[FederatedJob, dict[str, Any]]] = field(default_factory=dict)

    def silo_view(self, silo: str) -> tuple[FederatedJob, dict[str, Any]]:
        """What `silo` may read of the job (`views.silo_job`), and that as a document; made once."""
        view = self._views.get(silo)
        if view is None:
            job = views.silo_job(self.job, silo)
            view = self._views[silo] = (job, dump_job(job))
        return view


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
