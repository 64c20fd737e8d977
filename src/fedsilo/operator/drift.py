"""Pure comparisons of a job's desired state with what is in the cluster.

`drift` says which fields of a child someone changed away from what the operator applies
(server defaults and controllers' additions are not drift); `external_endpoint` decides
which aggregator URL external silos get, or why they get none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fedsilo.spec import API_GROUP, FederatedJob

EXTERNAL_URL_ANNOTATION = f"{API_GROUP}/external-url"
# Top-level parts of a child the operator owns (status and server metadata are not).
OWNED_PARTS = ("spec", "data", "type")
OWNED_METADATA = ("labels", "annotations", "ownerReferences")


def _differences(desired: Any, actual: Any, path: str) -> list[str]:
    """Paths where `actual` does not contain `desired` (dicts: subset; lists: same length)."""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return [path]
        found: list[str] = []
        for key, value in desired.items():
            found += _differences(value, actual.get(key), f"{path}.{key}")
        return found
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return [path]
        found = []
        for index, (want, have) in enumerate(zip(desired, actual, strict=True)):
            found += _differences(want, have, f"{path}[{index}]")
        return found
    return [] if desired == actual else [path]


def drift(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """The fields of `desired` that `actual` lacks or holds with another value.

    Fields the server or controllers add (defaults, clusterIP, status, managedFields) are
    not drift; a changed, removed or added list element is.
    """
    found: list[str] = []
    for part in OWNED_PARTS:
        if part in desired:
            found += _differences(desired[part], actual.get(part), part)
    meta, actual_meta = desired.get("metadata") or {}, actual.get("metadata") or {}
    for part in OWNED_METADATA:
        if part in meta:
            found += _differences(meta[part], actual_meta.get(part), f"metadata.{part}")
    return found


@dataclass(frozen=True)
class ExternalEndpoint:
    """Where external silos join: `url`, or why there is none (`reason`, `message`).

    `ready` is None when the job has no external silos.
    """

    url: str | None
    ready: bool | None
    reason: str
    message: str


def external_endpoint(job: FederatedJob, annotations: Mapping[str, str] | None) -> ExternalEndpoint:
    """The public aggregator URL for external silos: `spec.aggregator.externalUrl`, else the
    `fedsilo.io/external-url` annotation; only https:// URLs are handed out."""
    names = [s.name for s in job.spec.silos if s.external]
    if not names:
        return ExternalEndpoint(None, None, "NoExternalSilos", "the job has no external silos")
    listed = ", ".join(names)
    spec_url = job.spec.aggregator.external_url
    url = spec_url or (annotations or {}).get(EXTERNAL_URL_ANNOTATION) or ""
    source = "spec.aggregator.externalUrl" if spec_url else f"annotation {EXTERNAL_URL_ANNOTATION}"
    if not url.strip():
        message = (
            f"external silos ({listed}) need the aggregator's public URL: set spec.aggregator.externalUrl "
            f"or annotate the job with {EXTERNAL_URL_ANNOTATION}=https://<public host>; "
            "the in-cluster URL is not handed out"
        )
        return ExternalEndpoint(None, False, "ExternalUrlMissing", message)
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname:
        message = f"{source} {url!r} is not an https:// URL; external silos connect to the aggregator only over HTTPS"
        return ExternalEndpoint(None, False, "InsecureExternalUrl", message)
    clean = url.strip().rstrip("/")
    return ExternalEndpoint(clean, True, "UrlPublished", f"external silos ({listed}) join at {clean} ({source})")
