"""What a silo may read of its job: its own slice, never another organisation's details.

The admin reads everything. A silo reads the spec with only its own silo entry in full
(other silos appear by name and role, which the round protocol reveals anyway), no
aggregator deployment details and no labels or annotations; in the status and round
history it sees its own record only. Pure functions over the read models.
"""

from __future__ import annotations

from typing import Any

from fedsilo.api import models as m
from fedsilo.spec import AggregatorSpec, DataSpec, FederatedJob, ObjectMeta, SiloSpec

REDACTED = "redacted"


def redacted_silos(job: FederatedJob) -> list[SiloSpec]:
    """Every silo entry as another silo may see it: name and role."""
    return [SiloSpec(name=s.name, role=s.role, data=DataSpec(path=REDACTED)) for s in job.spec.silos]


def silo_job(job: FederatedJob, silo: str, redacted: list[SiloSpec] | None = None) -> FederatedJob:
    """The job as `silo` sees it: what training needs plus its own entry (`redacted`: the others,
    made once per job document by the caller that serves many silos)."""
    own = job.spec.silo(silo)
    entries = zip(job.spec.silos, redacted or redacted_silos(job), strict=True)
    others = [own if s.name == own.name else r for s, r in entries]
    spec = job.spec.model_copy(update={"silos": others, "aggregator": AggregatorSpec()})
    return job.model_copy(update={"metadata": ObjectMeta(name=job.metadata.name), "spec": spec, "status": None})


def silo_status(status: m.JobStatus, silo: str) -> m.JobStatus:
    return status.model_copy(update={"silos": [s for s in status.silos if s.name == silo]})


def silo_history(rounds: list[m.RoundInfo], silo: str) -> list[m.RoundInfo]:
    """Rounds without the other silos: participation, per-silo step plans."""
    return [
        r.model_copy(
            update={
                "participants": [p for p in r.participants if p == silo],
                "metrics": _own_metrics(r.metrics, silo),
            }
        )
        for r in rounds
    ]


def _own_metrics(metrics: dict[str, Any], silo: str) -> dict[str, Any]:
    return {k: ({silo: v[silo]} if silo in v else {}) if isinstance(v, dict) else v for k, v in metrics.items()}
