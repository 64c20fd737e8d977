"""The operator's Kubernetes client: the official `kubernetes` client underneath, async on top.

Transport, TLS, client certificates, tokens and proxies are the `kubernetes` package's
(`ApiClient`, built from the same `kopf.ConnectionInfo` kopf logged in with); this module
adds only what the operator needs on top of it: a path per kind, server-side apply under the
field manager `fedsilo-operator`, and retries with exponential backoff (and `Retry-After`)
on 429, 5xx, optimistic-lock conflicts and dropped connections. Blocking calls run in a
worker thread, so kopf's event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import kopf
import urllib3
from kubernetes.client import ApiClient, Configuration

FIELD_MANAGER = "fedsilo-operator"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"

# kind -> (plural, namespaced) for the kinds the operator and its tests touch.
KINDS: dict[str, tuple[str, bool]] = {
    "Secret": ("secrets", True),
    "ConfigMap": ("configmaps", True),
    "Service": ("services", True),
    "PersistentVolumeClaim": ("persistentvolumeclaims", True),
    "Deployment": ("deployments", True),
    "Job": ("jobs", True),
    "NetworkPolicy": ("networkpolicies", True),
    "Event": ("events", True),
    "FederatedJob": ("federatedjobs", True),
    "Namespace": ("namespaces", False),
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "Certificate": ("certificates", True),  # cert-manager.io/v1 (spec.aggregator.tls.mode certManager)
}
# The kinds of a job's children, in deletion order (workloads first).
CHILD_KINDS: list[tuple[str, str]] = [
    ("batch/v1", "Job"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "Secret"),
]


class KubeError(Exception):
    """A Kubernetes API error with its HTTP status, the server's reason and message."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status}{f' {reason}' if reason else ''}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class RetryPolicy:
    """Which answers are retried, how often and how long to wait between tries."""

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def retriable(self, status: int) -> bool:
        """429, 5xx and a dropped connection (status 0).

        A 409 is the caller's to handle: `AlreadyExists` on create is an answer, and a
        `Conflict` on a write with a resourceVersion precondition needs a fresh read first
        (resending the same body cannot succeed). Server-side apply with force never conflicts.
        """
        return status == 0 or status == 429 or status >= 500

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds before try `attempt + 1`: the server's Retry-After, else jittered exponential."""
        if retry_after:
            try:
                return min(self.max_delay, max(0.0, float(retry_after)))
            except ValueError:
                pass
        backoff = min(self.max_delay, self.base_delay * 2**attempt)
        return backoff * (0.5 + random.random() / 2)  # jitter: replicas do not retry in step


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """URL path of a collection (name=None) or of one object."""
    plural, namespaced = KINDS[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{namespace}"
    path = f"{base}/{plural}"
    return f"{path}/{name}" if name else path


def _pem(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any] | None
    retry_after: str | None = None


class KubeClient:
    """Async client of one Kubernetes API server (see the module docstring)."""

    def __init__(
        self,
        api: ApiClient,
        retry: RetryPolicy | None = None,
        temp_files: list[str] | None = None,
        timeout: float = 30.0,
        namespaces: Sequence[str] = (),
    ) -> None:
        self._api = api
        self._retry = retry or RetryPolicy()
        self._temp_files = temp_files or []
        self._timeout = timeout
        # Where a list "in every namespace" looks when the operator's rights are Roles there.
        self._namespaces = tuple(namespaces)

    @classmethod
    def from_url(cls, url: str, retry: RetryPolicy | None = None) -> KubeClient:
        """A client of a plain-HTTP API server without credentials (an emulator in tests)."""
        config = Configuration(host=url.rstrip("/"))
        config.retries = False
        return cls(ApiClient(config), retry)

    @classmethod
    def from_connection(
        cls, info: kopf.ConnectionInfo, retry: RetryPolicy | None = None, namespaces: Sequence[str] = ()
    ) -> KubeClient:
        """Build a client from kopf's login result (CA, client certificate, token).

        `namespaces`: a list across the cluster lists these namespaces instead (the operator
        watching some namespaces has no cluster-wide rights); empty: the whole cluster.
        """
        temp_files: list[str] = []

        def as_file(data: str | bytes) -> str:
            handle, path = tempfile.mkstemp(prefix="fedsilo-kube-")
            with os.fdopen(handle, "wb") as f:
                f.write(_pem(data))
            temp_files.append(path)
            return path

        config = Configuration(host=info.server.rstrip("/"))
        config.retries = False  # retried here, with backoff, for every method
        config.verify_ssl = not info.insecure
        if info.ca_path:
            config.ssl_ca_cert = os.fsdecode(info.ca_path)
        elif info.ca_data:
            config.ssl_ca_cert = as_file(info.ca_data)
        if info.certificate_path:
            config.cert_file = os.fsdecode(info.certificate_path)
        elif info.certificate_data:
            config.cert_file = as_file(info.certificate_data)
        if info.private_key_path:
            config.key_file = os.fsdecode(info.private_key_path)
        elif info.private_key_data:
            config.key_file = as_file(info.private_key_data)
        if info.token:
            config.api_key = {"BearerToken": info.token}
            config.api_key_prefix = {"BearerToken": info.scheme or "Bearer"}
        elif info.username and info.password:
            config.username, config.password = info.username, info.password
        return cls(ApiClient(config), retry, temp_files, namespaces=namespaces)

    async def aclose(self) -> None:
        """Close the connection pool and remove temporary credential files."""
        self._api.close()
        for path in self._temp_files:
            if os.path.exists(path):
                os.unlink(path)

    def _send(self, method: str, url: str, headers: dict[str, str], body: Any) -> Response:
        """One blocking request through the `kubernetes` client (status 0: no answer)."""
        auth = ["BearerToken"] if self._api.configuration.api_key else []
        if self._api.configuration.username:
            headers = {**headers, "Authorization": str(self._api.configuration.get_basic_auth_token())}
        _, full_url, headers, body, _ = self._api.param_serialize(
            method, url, header_params=dict(headers), body=body, auth_settings=auth
        )
        try:
            response = self._api.call_api(method, full_url, headers, body, _request_timeout=self._timeout)
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Response(0, {"message": f"{type(exc).__name__}: {exc}"})
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {"message": data.decode(errors="replace")[:300]}
        return Response(response.status, parsed, response.headers.get("Retry-After"))

    async def _request(
        self, method: str, path: str, body: Any = None, content_type: str | None = None
    ) -> dict[str, Any] | None:
        """A request, retried per the policy; None on 404, KubeError on any other failure."""
        return (await self._call(method, path, body, content_type)).body

    async def _call(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Response:
        """A request, retried per the policy; the answer (404: body None) or KubeError."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        attempt = 0
        while True:
            response = await asyncio.to_thread(self._send, method, path, headers, body)
            status, answer = response.status, response.body or {}
            if 200 <= status < 300:
                return Response(status, answer)
            if status == 404:
                return Response(404, None)
            reason = str(answer.get("reason") or "")
            attempt += 1
            if attempt >= self._retry.attempts or not self._retry.retriable(status):
                raise KubeError(status, str(answer.get("message") or answer), reason)
            await asyncio.sleep(self._retry.delay(attempt - 1, response.retry_after))

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        return await self._request("GET", resource_path(api_version, kind, namespace, name))

    async def list(
        self, api_version: str, kind: str, namespace: str | None, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Objects carrying all `labels` (namespace None: the whole cluster, or each namespace the
        client is scoped to)."""
        if namespace is None and self._namespaces and KINDS[kind][1]:
            found: list[dict[str, Any]] = []
            for scoped in self._namespaces:
                found += await self.list(api_version, kind, scoped, labels)
            return found
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        path = f"{resource_path(api_version, kind, namespace)}?labelSelector={quote(selector)}"
        items = (await self._request("GET", path) or {}).get("items", [])
        # Filter again client-side: an emulated API server may ignore labelSelector.
        return [
            item
            for item in items
            if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create an object; KubeError(409) when it already exists, (404) when its namespace does not."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        created = await self._request("POST", f"{path}?fieldManager={FIELD_MANAGER}", manifest)
        if created is None:
            raise KubeError(404, f"namespace {meta.get('namespace')} not found", "NotFound")
        return created

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any] | None:
        """JSON merge-patch an object (None when it does not exist)."""
        path = resource_path(api_version, kind, namespace, name)
        if subresource:
            path += f"/{subresource}"
        return await self._request("PATCH", f"{path}?fieldManager={FIELD_MANAGER}", patch, MERGE_PATCH)

    async def apply(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Server-side apply as `fedsilo-operator` (conflicts forced); returns (object, created).

        Fields the manifest sets are restored if someone changed them; fields others own
        (defaults, controllers' status) are left alone. KubeError(404) when the namespace
        does not exist.
        """
        meta = manifest["metadata"]
        namespace = meta.get("namespace")
        path = resource_path(manifest["apiVersion"], manifest["kind"], namespace, meta["name"])
        query = f"?fieldManager={FIELD_MANAGER}&force=true"
        applied = await self._call("PATCH", path + query, manifest, APPLY_PATCH)
        if applied.body is None:
            raise KubeError(404, f"namespace {namespace} not found", "NotFound")
        return applied.body, applied.status == 201

    async def ensure(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the object unless it exists (never changed afterwards); returns (object, created)."""
        try:
            return await self.create(manifest), True
        except KubeError as exc:
            if exc.status != 409:
                raise
        meta = manifest["metadata"]
        existing = await self.get(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        return existing or {}, False

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        """Delete an object and, in the background, what it owns (a Job's or Deployment's pods).

        Returns False when it was already gone. Without an explicit propagationPolicy the
        API server orphans a batch/v1 Job's pods, so the policy is always sent.
        """
        path = resource_path(api_version, kind, namespace, name)
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        return await self._request("DELETE", path, body) is not None
