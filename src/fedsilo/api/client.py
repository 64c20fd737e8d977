"""Typed client of the `/v1` API (httpx). Transient failures are retried with backoff.

Retried: connection errors, timeouts, 429 and 5xx. Not retried: other 4xx, which mean
the request itself is wrong and would fail again (they raise `ClientError`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx

from fedsilo.adapters import sha256
from fedsilo.api import models as m

log = logging.getLogger("fedsilo.client")


class ClientError(RuntimeError):
    def __init__(self, status: int, detail: str, reason: str | None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.reason = reason


class Client:
    """One job's view of the aggregator, as the admin or as one silo."""

    def __init__(
        self,
        base_url: str,
        job: str,
        token: str,
        silo: str | None = None,
        *,
        retries: int = 8,
        ca_bundle: Path | None = None,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        if silo:
            headers["X-Fedsilo-Silo"] = silo
        verify: Any = str(ca_bundle) if ca_bundle else True
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, verify=verify, transport=transport
        )
        self.job, self.silo, self.retries = job, silo, retries

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise
                log.warning(
                    "%s %s failed (%s); retry %d/%d in %.1fs", method, url, exc, attempt + 1, self.retries, delay
                )
            else:
                if response.status_code < 400:
                    return response
                if (response.status_code != 429 and response.status_code < 500) or attempt == self.retries:
                    raise _error(response)
                log.warning(
                    "%s %s -> %d; retry %d/%d in %.1fs",
                    method,
                    url,
                    response.status_code,
                    attempt + 1,
                    self.retries,
                    delay,
                )
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    # admin
    def create_job(self, job: m.FederatedJob, silo_tokens: dict[str, str]) -> m.JobCreated:
        body = m.CreateJob(job=job, silo_tokens=silo_tokens).model_dump(mode="json", by_alias=True, exclude_none=True)
        return m.JobCreated.model_validate(self._request("POST", "/v1/jobs", json=body).json())

    def patch_job(self, rounds: int) -> m.JobStatus:
        return m.JobStatus.model_validate(
            self._request("PATCH", f"/v1/jobs/{self.job}", json={"rounds": rounds}).json()
        )

    # readers
    def status(self) -> m.JobStatus:
        return m.JobStatus.model_validate(self._request("GET", f"/v1/jobs/{self.job}").json())

    def spec(self) -> m.FederatedJob:
        return m.FederatedJob.model_validate(self._request("GET", f"/v1/jobs/{self.job}/spec").json())

    def rounds(self) -> list[m.RoundInfo]:
        return [m.RoundInfo.model_validate(r) for r in self._request("GET", f"/v1/jobs/{self.job}/rounds").json()]

    def evaluations(self) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/v1/jobs/{self.job}/evaluations").json())

    def adapter(self, version: int) -> bytes:
        response = self._request("GET", f"/v1/jobs/{self.job}/adapters/{version}")
        etag = response.headers.get("etag", "").strip('"')
        if etag and sha256(response.content) != etag:
            raise ClientError(502, f"adapter {version} arrived corrupted (sha256 mismatch)", "bad_checksum")
        return response.content

    # silo
    def _silo_path(self) -> str:
        assert self.silo, "this client was built without a silo name"
        return f"/v1/jobs/{self.job}/silos/{self.silo}"

    def join(self, request: m.JoinRequest) -> m.JoinResponse:
        return m.JoinResponse.model_validate(
            self._request("POST", f"{self._silo_path()}/join", json=request.model_dump()).json()
        )

    def task(self) -> m.Task:
        return m.Task.model_validate(self._request("GET", f"{self._silo_path()}/task").json())

    def put_initial(self, data: bytes) -> str:
        return str(
            self._request(
                "PUT",
                f"{self._silo_path()}/adapters/0",
                content=data,
                headers={"Content-Type": m.SAFETENSORS_MEDIA_TYPE},
            ).json()["sha256"]
        )

    def put_update(
        self, round_: int, data: bytes, n_examples: int, train_seconds: float, examples_seen: int | None = None
    ) -> m.UpdateAccepted:
        headers = {
            "Content-Type": m.SAFETENSORS_MEDIA_TYPE,
            m.HEADER_EXAMPLES: str(n_examples),
            m.HEADER_SHA256: sha256(data),
            m.HEADER_TRAIN_SECONDS: f"{train_seconds:.4f}",
        }
        if examples_seen:
            headers["X-Fedsilo-Examples-Seen"] = str(examples_seen)
        response = self._request(
            "PUT", f"/v1/jobs/{self.job}/rounds/{round_}/updates/{self.silo}", content=data, headers=headers
        )
        return m.UpdateAccepted.model_validate(response.json())

    def post_metrics(self, report: m.MetricsReport) -> None:
        self._request("POST", f"{self._silo_path()}/metrics", json=report.model_dump())


def _error(response: httpx.Response) -> ClientError:
    try:
        body = response.json()
        return ClientError(response.status_code, str(body.get("detail")), body.get("reason"))
    except ValueError:
        return ClientError(response.status_code, response.text[:500], None)
