"""A job's children in the cluster: apply what the job wants, prune the rest, remember it.

`reconcile` server-side-applies every child (create-only kinds are created when missing),
deletes labelled children the job no longer wants and reports an `Outcome`. `Desired`
remembers the last applied manifests, so a watch event on a child can be judged (deleted
or drifted?) without a request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedsilo.operator import naming
from fedsilo.operator.certificates import read_job_tls
from fedsilo.operator.drift import EXTERNAL_URL_ANNOTATION, drift, external_endpoint
from fedsilo.operator.kube import CHILD_KINDS, KubeClient, KubeError
from fedsilo.operator.manifests import job_children
from fedsilo.operator.objects import ensure_tokens, job_from_body
from fedsilo.operator.reconciled import Failure, Outcome
from fedsilo.operator.settings import OperatorSettings
from fedsilo.spec import FederatedJob

# Children created once and never patched: a bound PVC's spec and a Job's pod template are
# immutable (a patch would be refused), and a finished silo Job must stay as it is.
CREATE_ONLY_KINDS = frozenset({"PersistentVolumeClaim", "Job"})
Key = tuple[str, str | None, str]
JobRef = tuple[str, str]  # (namespace, name) of a FederatedJob

__all__ = ["CREATE_ONLY_KINDS", "EXTERNAL_URL_ANNOTATION", "Desired", "delete_children", "reconcile"]


def key(manifest: Mapping[str, Any]) -> Key:
    """(kind, namespace, name) of a manifest or an object."""
    meta = manifest["metadata"]
    return manifest["kind"], meta.get("namespace"), meta["name"]


def describe(item: Key) -> str:
    """`Deployment fl/demo-aggregator`."""
    kind, namespace, name = item
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def labels_of(job: FederatedJob) -> dict[str, str]:
    return {naming.LABEL_JOB: job.metadata.name, naming.LABEL_JOB_NAMESPACE: naming.job_namespace(job)}


async def job_objects(kube: KubeClient, job: FederatedJob) -> list[dict[str, Any]]:
    """Every labelled child of the job, in every namespace."""
    found: list[dict[str, Any]] = []
    for api_version, kind in CHILD_KINDS:
        for item in await kube.list(api_version, kind, None, labels_of(job)):
            found.append({**item, "apiVersion": api_version, "kind": kind})
    return found


async def delete_children(kube: KubeClient, job: FederatedJob, keep: set[Key]) -> int:
    """Delete the job's labelled children not in `keep`; returns how many were deleted."""
    deleted = 0
    for item in await job_objects(kube, job):
        if key(item) not in keep:
            kind, namespace, name = key(item)
            deleted += await kube.delete(item["apiVersion"], kind, namespace, name)
    return deleted


def failure(child: Mapping[str, Any], exc: KubeError) -> Failure:
    """A failed apply as something a user can act on."""
    where = describe(key(child))
    namespace = child["metadata"].get("namespace")
    if exc.status == 404:
        message = f"namespace {namespace} does not exist: create it, or change the silo's namespace in the spec"
        return Failure(where, "NamespaceNotFound", message, namespace)
    if exc.status == 403:
        return Failure(where, "Forbidden", f"the operator's ServiceAccount may not write it: {exc.message}")
    if exc.status == 422:
        return Failure(where, "Invalid", f"the API server refused it: {exc.message}")
    return Failure(where, "ApplyFailed", f"HTTP {exc.status}: {exc.message}")


class Desired:
    """The manifests last applied for each job, indexed by child (in-process memory)."""

    def __init__(self) -> None:
        self._by_job: dict[JobRef, dict[Key, dict[str, Any]]] = {}
        self._owner: dict[Key, JobRef] = {}
        self._written_elsewhere: set[Key] = set()
        self._applied: set[Key] = set()  # applied successfully at least once

    def remember(self, job: JobRef, children: Iterable[dict[str, Any]], written_elsewhere: Iterable[Key] = ()) -> None:
        """Replace what `job` wants. Children `written_elsewhere` (the tokens Secret, which
        spec changes extend) are repaired when deleted, never judged by their content."""
        self.forget(job)
        wanted = {key(c): c for c in children}
        self._by_job[job] = wanted
        for item in wanted:
            self._owner[item] = job
        self._written_elsewhere.update(written_elsewhere)

    def applied(self, item: Key) -> None:
        """Note that `item` is in the cluster (applied successfully)."""
        self._applied.add(item)

    def known(self, job: JobRef) -> set[Key]:
        """The children of `job` applied successfully before (empty after an operator restart)."""
        return {item for item in self._by_job.get(job, {}) if item in self._applied}

    def forget(self, job: JobRef) -> None:
        for item in self._by_job.pop(job, {}):
            self._owner.pop(item, None)
            self._written_elsewhere.discard(item)
            self._applied.discard(item)

    def owner(self, item: Key) -> JobRef | None:
        return self._owner.get(item)

    def needs_repair(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """A watch event on a child: deleted while still wanted, or changed away from what was applied."""
        item = key(body)
        job = self._owner.get(item)
        if job is None:
            return False
        if event_type == "DELETED":
            return True
        if event_type != "MODIFIED" or item[0] in CREATE_ONLY_KINDS or item in self._written_elsewhere:
            return False
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return False
        return bool(drift(self._by_job[job][item], body))

    def drifted(self, body: Mapping[str, Any]) -> list[str]:
        """The drifted fields of a child (empty when unknown or in line)."""
        item = key(body)
        job = self._owner.get(item)
        return drift(self._by_job[job][item], body) if job is not None else []


async def reconcile(
    kube: KubeClient,
    body: Mapping[str, Any],
    settings: OperatorSettings,
    desired: Desired | None = None,
    repairing: Iterable[Key] = (),
) -> tuple[FederatedJob, Outcome]:
    """Apply every child of the job, prune the unwanted ones; idempotent.

    A child that cannot be applied (its namespace missing, refused) is recorded as a
    `Failure` and the others are still applied. Children in `repairing` (deleted or
    drifted, seen by a watch) are reported as repaired rather than created.
    """
    job = job_from_body(body)
    meta = body.get("metadata", {})
    uid = str(meta.get("uid") or "")
    tokens = await ensure_tokens(kube, job, uid)
    job_tls = await read_job_tls(kube, job, settings)
    endpoint = external_endpoint(job, meta.get("annotations") or {})
    children = job_children(job, uid, tokens, settings, endpoint.url, job_tls)
    outcome = Outcome(endpoint=endpoint)
    repair = set(repairing)
    secret_key = ("Secret", naming.job_namespace(job), naming.tokens_secret_name(job))
    applied_before: set[Key] = set()
    if desired is not None:  # before applying: the watch events of these writes are no drift
        ref = (naming.job_namespace(job), job.metadata.name)
        applied_before = desired.known(ref)
        desired.remember(ref, children, [secret_key])
        for item in applied_before:
            desired.applied(item)
    for child in children:
        item = key(child)
        if item == secret_key:  # ensure_tokens keeps it (tokens are never rotated by a reconcile)
            outcome.applied += 1
            if desired is not None:
                desired.applied(item)
            if item in repair:
                outcome.repaired.append(describe(item))
            continue
        try:
            if child["kind"] in CREATE_ONLY_KINDS:
                _, created = await kube.ensure(child)
            else:
                _, created = await kube.apply(child)
        except KubeError as exc:
            outcome.failures.append(failure(child, exc))
            continue
        outcome.applied += 1
        if desired is not None:
            desired.applied(item)
        if item in repair or (created and item in applied_before):  # it was there, then it was gone
            outcome.repaired.append(describe(item))
        elif created:
            outcome.created.append(describe(item))
    outcome.pruned = await delete_children(kube, job, {key(c) for c in children})
    return job, outcome
