"""The operator's view of an aggregator: job status and round changes over `/v1` (httpx)."""

from __future__ import annotations

import httpx

from fedsilo.api.models import API_PREFIX, JobStatus


class AggregatorError(Exception):
    """The aggregator could not be reached or refused the request."""


class AggregatorClient:
    """Admin calls to one aggregator. Tests inject an `httpx.MockTransport` as `transport`."""

    def __init__(
        self,
        base_url: str,
        admin_token: str,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {admin_token}"}
        self._transport = transport
        self._timeout = timeout

    async def _call(
        self, method: str, path: str, json: dict[str, int] | None = None
    ) -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            transport=self._transport,
            timeout=self._timeout,
        ) as client:
            try:
                response = await client.request(method, f"{API_PREFIX}{path}", json=json)
            except httpx.HTTPError as exc:
                raise AggregatorError(f"{self.base_url} unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            raise AggregatorError(
                f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}"
            )
        return response

    async def job_status(self, job: str) -> JobStatus:
        """GET /v1/jobs/{job}."""
        response = await self._call("GET", f"/jobs/{job}")
        return JobStatus.model_validate(response.json())

    async def set_rounds(self, job: str, rounds: int) -> None:
        """PATCH /v1/jobs/{job} {"rounds": N}: raise (or lower) the round count."""
        await self._call("PATCH", f"/jobs/{job}", json={"rounds": rounds})
