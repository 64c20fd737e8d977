"""Typed client of the `/v1` API (httpx), built to ride out aggregator outages.

Every exchange ends in one of a few typed outcomes:
- a 2xx answer, parsed into its response model;
- for an update upload, an `Upload` whose `outcome` says ACCEPTED, DUPLICATE (the
  aggregator already holds an update of ours for that round) or LATE (the round is
  closed: move on to the next task);
- `ClientError` for a 4xx that means the request itself is wrong (bad token, unknown
  job, wrong shape, oversize body...): retrying cannot help.

Transport errors (connection refused, resets, timeouts mid-body), 408, 429 and 5xx are
retried with exponential backoff and full jitter up to a cap, honouring `Retry-After`.
`retries=None` retries for ever (the silo agent's default). Re-sending is safe: the
server treats an identical update, initial adapter, join or metrics report as a no-op.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from fedsilo.adapters import sha256
from fedsilo.api import models as m
from fedsilo.tls import client_context

__all__ = ["Backoff", "Client", "ClientError", "Outcome", "Upload"]

log = logging.getLogger("fedsilo.client")

RETRIED_STATUSES = frozenset({408, 429})  # and every 5xx
# 409s that mean "this round has moved on without you"
LATE_REASONS = frozenset({"wrong_round", "stale", "wrong_stage"})
MAX_LONG_POLL = 30.0  # the server's ceiling for `?wait=`
LONG_POLL_MARGIN = 30.0  # read timeout of a long poll: wait + this
MAX_RETRY_AFTER = 600.0  # a Retry-After longer than this is read as this
REMIND_EVERY = 300.0  # seconds between "still unreachable" warnings during one outage


class ClientError(RuntimeError):
    """The aggregator refused the request (4xx) or kept failing past a bounded retry count."""

    def __init__(self, status: int, detail: str, reason: str | None) -> None:
        super().__init__(f"HTTP {status}: {detail}" + (f" ({reason})" if reason else ""))
        self.status = status
        self.detail = detail
        self.reason = reason


class Outcome(enum.Enum):
    """What became of an update upload."""

    ACCEPTED = "accepted"  # counted in the round now
    DUPLICATE = "duplicate"  # already counted: an identical re-send, or a different update of ours held
    LATE = "late"  # the round closed (or the update is stale): skip to the next task


@dataclass(frozen=True)
class Upload:
    """The answer to `Client.put_update`."""

    outcome: Outcome
    round: int
    sha256: str  # of the bytes sent
    detail: str = ""  # the aggregator's words when it did not count this upload


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: retry n waits uniform(0, min(cap, base * 2**n)) seconds.

    A `Retry-After` from the server is honoured: never retry sooner than it asks.
    """

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt, 60))
        wait = rng.uniform(0.0, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
        return wait


@dataclass
class _Outage:
    """One call's run of transient failures: logged when it starts, every few minutes, and when it ends."""

    call: str
    limit: str
    retries: int = 0
    started: float = 0.0
    reminded: float = 0.0

    def failed(self, failure: str, cap: float) -> None:
        now = time.monotonic()
        if self.retries == 0:
            self.started = self.reminded = now
            log.warning("%s failed (%s): retrying %s, backoff up to %gs", self.call, failure, self.limit, cap)
        elif now - self.reminded >= REMIND_EVERY:
            self.reminded = now
            log.warning(
                "aggregator still unreachable after %.0fs (%d retries; last: %s)",
                now - self.started,
                self.retries,
                failure,
            )
        else:
            log.debug("%s failed (%s): retry %d", self.call, failure, self.retries + 1)
        self.retries += 1

    def over(self) -> None:
        if self.retries:
            log.info(
                "aggregator answers again after %.1fs (%d retries of %s)",
                time.monotonic() - self.started,
                self.retries,
                self.call,
            )


class Client:
    """One job's view of the aggregator, as the admin or as one silo.

    `retries`: retries per call before giving up (`None`: for ever). `backoff_cap`: the
    longest pause between two retries. `ca_bundle`: the CA that signs the aggregator's
    certificate (default: public CAs). `client_cert`: (certificate, key) files for mutual
    TLS. `server_name`: the name to expect in the server's certificate when the URL names
    another host (a port-forward to 127.0.0.1). `sleep` and `rng` are injectable for tests.
    """

    def __init__(
        self,
        base_url: str,
        job: str,
        token: str,
        silo: str | None = None,
        *,
        retries: int | None = 8,
        ca_bundle: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
        server_name: str | None = None,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
        backoff_cap: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        token_source: Callable[[], str] | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        if silo:
            headers["X-Fedsilo-Silo"] = silo
        verify: Any = client_context(ca_bundle, client_cert) if ca_bundle or client_cert else True
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, verify=verify, transport=transport
        )
        self.job, self.silo, self.retries, self.timeout = job, silo, retries, timeout
        self.server_name = server_name
        self.backoff = Backoff(cap=backoff_cap)
        self.sleep, self.rng = sleep, rng or random.Random()
        self.token_source = token_source

    def _token_changed(self) -> bool:
        """After a 401: has the token been rotated under us (a re-mounted Secret)? Then use the new one."""
        if self.token_source is None:
            return False
        try:
            token = self.token_source()
        except (OSError, ValueError) as exc:
            log.warning("cannot re-read the token: %s", exc)
            return False
        header = f"Bearer {token}"
        if header == self.http.headers.get("Authorization"):
            return False
        self.http.headers["Authorization"] = header
        log.info("the token was rotated: using the new one")
        return True

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, *, conflicts: bool = False, **kwargs: Any) -> httpx.Response:
        """Send until the aggregator answers something other than a transient failure.

        Returns 2xx/3xx answers (and 409 when `conflicts`); raises `ClientError` for other 4xx.
        """
        outage = _Outage(f"{method} {url}", "for ever" if self.retries is None else f"up to {self.retries} times")
        if self.server_name:  # SNI and certificate check use this name, not the URL's host
            kwargs["extensions"] = {**kwargs.get("extensions", {}), "sni_hostname": self.server_name}
        while True:
            try:
                response = self.http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if self.retries is not None and outage.retries >= self.retries:
                    raise
                outage.failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, self.backoff.cap)
                self.sleep(self.backoff.delay(outage.retries - 1, self.rng))
                continue
            if not _transient(response.status_code):
                outage.over()
                if response.status_code < 400 or (conflicts and response.status_code == 409):
                    return response
                if response.status_code == 401 and self._token_changed():
                    continue  # the same request with the rotated token
                raise _error(response)
            if self.retries is not None and outage.retries >= self.retries:
                raise _error(response)
            outage.failed(f"HTTP {response.status_code}", self.backoff.cap)
            self.sleep(self.backoff.delay(outage.retries - 1, self.rng, _retry_after(response)))

    # admin
    def create_job(self, job: m.FederatedJob, silo_tokens: dict[str, str]) -> m.JobCreated:
        body = m.CreateJob(job=job, silo_tokens=silo_tokens).model_dump(mode="json", by_alias=True, exclude_none=True)
        return m.JobCreated.model_validate(self._request("POST", "/v1/jobs", json=body).json())

    def patch_job(
        self,
        rounds: int | None = None,
        *,
        resume: bool = False,
        job: m.FederatedJob | None = None,
        silo_tokens: dict[str, str] | None = None,
    ) -> m.JobStatus:
        """Change rounds, resume a Failed job, or apply a changed job document (see `PatchJob`)."""
        patch = m.PatchJob(rounds=rounds, resume=resume, silo_tokens=silo_tokens or {})
        body = patch.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
        if job is not None:  # whole, as create_job sends it: exclude_defaults would strip the document's own fields
            body["job"] = job.model_dump(mode="json", by_alias=True, exclude_none=True)
        return m.JobStatus.model_validate(self._request("PATCH", f"/v1/jobs/{self.job}", json=body).json())

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
        """Global adapter `version` as safetensors bytes; a corrupted download is fetched again."""
        for _ in range(3):
            response = self._request("GET", f"/v1/jobs/{self.job}/adapters/{version}")
            etag = response.headers.get("etag", "").strip('"')
            if not etag or sha256(response.content) == etag:
                return response.content
            log.warning("adapter %d arrived corrupted (sha256 mismatch); fetching it again", version)
        raise ClientError(502, f"adapter {version} arrived corrupted (sha256 mismatch) three times", "bad_checksum")

    # silo
    def _silo_path(self) -> str:
        assert self.silo, "this client was built without a silo name"
        return f"/v1/jobs/{self.job}/silos/{self.silo}"

    def join(self, request: m.JoinRequest) -> m.JoinResponse:
        return m.JoinResponse.model_validate(
            self._request("POST", f"{self._silo_path()}/join", json=request.model_dump()).json()
        )

    def task(self, wait: float = 0.0) -> m.Task:
        """This silo's task. `wait` > 0 asks the server to hold a `wait` answer up to that many seconds.

        A server that does not know long polls answers at once; callers pace their polls anyway.
        """
        if wait <= 0:
            return m.Task.model_validate(self._request("GET", f"{self._silo_path()}/task").json())
        wait = min(wait, MAX_LONG_POLL)
        response = self._request(
            "GET",
            f"{self._silo_path()}/task",
            params={"wait": f"{wait:g}"},
            timeout=httpx.Timeout(self.timeout, read=max(self.timeout, wait + LONG_POLL_MARGIN)),
        )
        return m.Task.model_validate(response.json())

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
    ) -> Upload:
        """Upload this silo's delta for `round_`; see `Outcome` for what can become of it."""
        digest = sha256(data)
        headers = {
            "Content-Type": m.SAFETENSORS_MEDIA_TYPE,
            m.HEADER_EXAMPLES: str(n_examples),
            m.HEADER_SHA256: digest,
            m.HEADER_TRAIN_SECONDS: f"{train_seconds:.4f}",
        }
        if examples_seen:
            headers["X-Fedsilo-Examples-Seen"] = str(examples_seen)
        response = self._request(
            "PUT",
            f"/v1/jobs/{self.job}/rounds/{round_}/updates/{self.silo}",
            content=data,
            headers=headers,
            conflicts=True,
        )
        if response.status_code == 409:
            error = _error(response)
            if error.reason == "duplicate":
                return Upload(Outcome.DUPLICATE, round_, digest, error.detail)
            if error.reason in LATE_REASONS:
                return Upload(Outcome.LATE, round_, digest, error.detail)
            raise error
        accepted = m.UpdateAccepted.model_validate(response.json())
        return Upload(Outcome.DUPLICATE if accepted.duplicate else Outcome.ACCEPTED, accepted.round, accepted.sha256)

    def post_metrics(self, report: m.MetricsReport) -> None:
        self._request("POST", f"{self._silo_path()}/metrics", json=report.model_dump())

    # secure aggregation (the stages of `aggregator/secure.py`)
    def _secagg_path(self, round_: int) -> str:
        return f"/v1/jobs/{self.job}/rounds/{round_}/secagg/{self.silo}"

    def secagg_view(self, round_: int, after: str | None = None, wait: float = 0.0) -> m.SecAggView:
        """The secure round's stage; with `after` and `wait`, held until the stage is not `after`."""
        params: dict[str, str] = {}
        if after is not None and wait > 0:
            wait = min(wait, MAX_LONG_POLL)
            params = {"after": after, "wait": f"{wait:g}"}
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, float(params.get("wait", 0)) + LONG_POLL_MARGIN))
        response = self._request("GET", self._secagg_path(round_), params=params, timeout=timeout)
        return m.SecAggView.model_validate(response.json())

    def secagg_put(self, round_: int, what: str, body: m.Wire) -> None:
        """Post keys, shares or a reveal; a retry of the same body is answered like the first."""
        self._request("PUT", f"{self._secagg_path(round_)}/{what}", json=body.model_dump(mode="json"))


def _transient(status: int) -> bool:
    return status >= 500 or status in RETRIED_STATUSES


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP-date), if any."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error(response: httpx.Response) -> ClientError:
    try:
        body = response.json()
        return ClientError(response.status_code, str(body.get("detail")), body.get("reason"))
    except (ValueError, AttributeError):
        return ClientError(response.status_code, response.text[:500], None)
