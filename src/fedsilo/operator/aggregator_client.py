"""The operator's view of an aggregator: job status, spec changes, resumes and token rotations
over `/v1` (httpx).

Errors come in two kinds. `AggregatorError` means "not now": the aggregator is not
reachable, failed (5xx) or cannot take the change at this moment (409 `conflict` or
`fenced`, 429); the caller retries. `AggregatorRefused` (a subclass) is the aggregator's
final answer (422 `immutable`, 409 `not_failed`, other 4xx): retrying does not help.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from fedsilo.api.models import API_PREFIX, JobStatus, RotateToken, TokenIssued

# 409 reasons that are an answer, not a "try again later" (`conflict`, `fenced` are transient).
FINAL_CONFLICTS = frozenset({"not_failed"})
TRANSIENT_STATUSES = frozenset({408, 425, 429})


class AggregatorError(Exception):
    """The aggregator could not take the request now (unreachable, 5xx, 409 fenced): retry."""


class AggregatorRefused(AggregatorError):
    """The aggregator answered and refused the request; retrying the same request does not help."""

    def __init__(self, status: int, reason: str | None, detail: str) -> None:
        super().__init__(f"HTTP {status} {reason or 'refused'}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


def is_transient(status: int, reason: str | None) -> bool:
    """Whether an HTTP error answer means "retry later" rather than "no"."""
    if status >= 500 or status in TRANSIENT_STATUSES:
        return True
    return status == 409 and reason not in FINAL_CONFLICTS


def retry_delay(retry: int, base: float, cap: float = 300.0) -> float:
    """Exponential backoff for the `retry`-th retry (0-based): base, 2*base, 4*base... up to cap."""
    return float(min(cap, base * 2 ** min(retry, 32)))


def _problem(response: httpx.Response) -> tuple[str | None, str]:
    """The `reason` and `detail` of a Problem body (or the raw text)."""
    try:
        body = response.json()
    except ValueError:
        return None, response.text[:300]
    if not isinstance(body, dict):
        return None, response.text[:300]
    reason = body.get("reason")
    return (str(reason) if reason else None), str(body.get("detail") or response.text[:300])


class AggregatorClient:
    """Admin calls to one aggregator. Tests inject an `httpx.MockTransport` as `transport`."""

    def __init__(
        self,
        base_url: str,
        admin_token: str,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 5.0,
        ca: str | None = None,
    ) -> None:
        """`ca`: PEM of the CA that signs the aggregator's certificate (None: public CAs)."""
        self.base_url = base_url.rstrip("/")
        self._verify: ssl.SSLContext | bool = ssl.create_default_context(cadata=ca) if ca else True
        self._headers = {"Authorization": f"Bearer {admin_token}"}
        self._transport = transport
        self._timeout = timeout

    async def _call(self, method: str, path: str, json: dict[str, Any] | None = None) -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            transport=self._transport,
            timeout=self._timeout,
            verify=self._verify,
        ) as client:
            try:
                response = await client.request(method, f"{API_PREFIX}{path}", json=json)
            except httpx.HTTPError as exc:
                raise AggregatorError(f"{self.base_url} unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            reason, detail = _problem(response)
            if is_transient(response.status_code, reason):
                raise AggregatorError(f"{method} {path}: HTTP {response.status_code} {reason or ''}: {detail}")
            raise AggregatorRefused(response.status_code, reason, detail)
        return response

    async def job_status(self, job: str) -> JobStatus:
        """GET /v1/jobs/{job}."""
        response = await self._call("GET", f"/jobs/{job}")
        return JobStatus.model_validate(response.json())

    async def job_document(self, job: str) -> dict[str, Any]:
        """GET /v1/jobs/{job}/spec: the FederatedJob document the aggregator runs now."""
        response = await self._call("GET", f"/jobs/{job}/spec")
        document = response.json()
        return document if isinstance(document, dict) else {}

    async def apply_spec(self, job: str, document: dict[str, Any], silo_tokens: dict[str, str]) -> None:
        """PATCH /v1/jobs/{job} {"job": document, "silo_tokens": ...}: change the running job.

        `silo_tokens` holds a token for each silo the document adds.
        """
        await self._call("PATCH", f"/jobs/{job}", json={"job": document, "silo_tokens": silo_tokens})

    async def resume(self, job: str) -> None:
        """PATCH /v1/jobs/{job} {"resume": true}: run a Failed job again.

        Raises `AggregatorRefused` with reason `not_failed` when the job is not Failed.
        """
        await self._call("PATCH", f"/jobs/{job}", json={"resume": True})

    async def rotate_token(self, job: str, silo: str, token: str, grace_seconds: float) -> TokenIssued:
        """POST /v1/jobs/{job}/silos/{silo}/token: `token` replaces the silo's token; the current
        one keeps working for `grace_seconds`. Retry-safe: the same call again changes nothing.
        """
        body = RotateToken(token=token, grace_seconds=grace_seconds).model_dump(mode="json", exclude_none=True)
        response = await self._call("POST", f"/jobs/{job}/silos/{silo}/token", json=body)
        return TokenIssued.model_validate(response.json())
