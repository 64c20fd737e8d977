"""A small async Kubernetes REST client (httpx) for the operator's children.

It speaks only what the operator needs: get, list by labels, create, merge-patch,
delete, and `apply` = create-or-patch tolerating 409 AlreadyExists. It is built from
the same `kopf.ConnectionInfo` kopf itself logged in with.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from typing import Any

import httpx
import kopf

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
MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """A Kubernetes API error with its HTTP status and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


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


class KubeClient:
    """Async client of one Kubernetes API server."""

    def __init__(self, client: httpx.AsyncClient, temp_files: list[str] | None = None) -> None:
        self._client = client
        self._temp_files = temp_files or []

    @classmethod
    def from_connection(cls, info: kopf.ConnectionInfo) -> KubeClient:
        """Build a client from kopf's login result (CA, client certificate, token)."""
        temp_files: list[str] = []

        def as_file(data: str | bytes) -> str:
            handle, path = tempfile.mkstemp(prefix="fedsilo-kube-")
            with os.fdopen(handle, "wb") as f:
                f.write(_pem(data))
            temp_files.append(path)
            return path

        verify: ssl.SSLContext | bool = True
        if info.insecure:
            verify = False
        elif info.ca_path or info.ca_data:
            verify = ssl.create_default_context(cafile=os.fsdecode(info.ca_path) if info.ca_path else None)
            if info.ca_data:
                verify.load_verify_locations(cadata=_pem(info.ca_data).decode())
        cert_path = info.certificate_path or (as_file(info.certificate_data) if info.certificate_data else None)
        key_path = info.private_key_path or (as_file(info.private_key_data) if info.private_key_data else None)
        if cert_path and isinstance(verify, ssl.SSLContext):
            verify.load_cert_chain(os.fsdecode(cert_path), os.fsdecode(key_path) if key_path else None)
        elif cert_path:
            verify = ssl.create_default_context()
            verify.load_cert_chain(os.fsdecode(cert_path), os.fsdecode(key_path) if key_path else None)
        headers = {}
        auth: httpx.BasicAuth | None = None
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            auth = httpx.BasicAuth(info.username, info.password)
        client = httpx.AsyncClient(base_url=info.server, verify=verify, headers=headers, auth=auth, timeout=30.0)
        return cls(client, temp_files)

    async def aclose(self) -> None:
        """Close the connection pool and remove temporary credential files."""
        await self._client.aclose()
        for path in self._temp_files:
            if os.path.exists(path):
                os.unlink(path)

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any] | None:
        response = await self._client.request(method, path, **kwargs)
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise KubeError(response.status_code, message)
        return response.json() if response.content else {}

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        return await self._request("GET", resource_path(api_version, kind, namespace, name))

    async def list(
        self, api_version: str, kind: str, namespace: str | None, labels: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Objects carrying all `labels` (namespace None: the whole cluster)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        path = resource_path(api_version, kind, namespace)
        body = await self._request("GET", path, params={"labelSelector": selector})
        items = (body or {}).get("items", [])
        # Filter again client-side: some emulated API servers ignore labelSelector.
        return [
            item
            for item in items
            if all((item.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create an object; KubeError(409) when it already exists."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        created = await self._request("POST", path, json=manifest)
        if created is None:
            raise KubeError(404, f"{path} not found (namespace or resource missing)")
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
        return await self._request("PATCH", path, json=patch, headers={"Content-Type": MERGE_PATCH})

    async def apply(self, manifest: dict[str, Any], patch_existing: bool = True) -> dict[str, Any]:
        """Create, or (on 409 AlreadyExists) merge-patch to the manifest. Idempotent."""
        try:
            return await self.create(manifest)
        except KubeError as exc:
            if exc.status != 409:
                raise
        meta = manifest["metadata"]
        if not patch_existing:
            existing = await self.get(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
            return existing or {}
        patched = await self.patch(
            manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"], manifest
        )
        return patched or {}

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        """Delete an object and, in the background, what it owns (a Job's or Deployment's pods).

        Returns False when it was already gone. Without an explicit propagationPolicy the
        API server orphans a batch/v1 Job's pods, so the policy is always sent.
        """
        path = resource_path(api_version, kind, namespace, name)
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        return await self._request("DELETE", path, json=body) is not None
