"""A job's objects as the handlers read them: the resource as a spec model, its tokens
Secret (created once, extended and trimmed as silos come and go), a child's identity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsilo.operator import naming
from fedsilo.operator.kube import KubeClient, KubeError
from fedsilo.operator.manifests import tokens_secret
from fedsilo.operator.tokens import Tokens, complete_tokens, tokens_from_secret
from fedsilo.spec import API_GROUP, API_VERSION, KIND, FederatedJob, parse_job


def job_from_body(body: Mapping[str, Any]) -> FederatedJob:
    """The FederatedJob model of a kopf body (status and server metadata dropped)."""
    meta = body.get("metadata", {})
    document = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": dict(body.get("spec") or {}),
    }
    return parse_job(document)


async def ensure_tokens(kube: KubeClient, job: FederatedJob, uid: str) -> Tokens:
    """Create the tokens Secret once; later runs keep its tokens, add added silos' tokens and
    drop removed silos' tokens."""
    namespace, name = naming.job_namespace(job), naming.tokens_secret_name(job)
    existing = tokens_from_secret(await kube.get("v1", "Secret", namespace, name))
    tokens = complete_tokens(existing, job.spec)
    if existing is None:
        try:
            await kube.create(tokens_secret(job, uid, tokens))
        except KubeError as exc:
            if exc.status != 409:
                raise
            # Another run created it first: keep its tokens.
            return await ensure_tokens(kube, job, uid)
    elif tokens != existing:
        await kube.patch("v1", "Secret", namespace, name, {"data": tokens.secret_data()})
    return tokens


def where(item: Mapping[str, Any]) -> tuple[str | None, str]:
    meta = item["metadata"]
    return meta.get("namespace"), meta["name"]
