"""Status writes racing other writers, made to happen on purpose (kmock emulator, real kopf).

A timer's `body` is live in kopf: events that arrive while the handler awaits replace its
contents. The status poll computes its fields from the status before it asks the aggregator;
those fields must be written against that status, or a condition another handler changed in
the meantime is put back to what the poll saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import kmock
from tests.operator.test_handlers_kmock import (
    JOB_API,
    NS,
    TIMEOUT,
    FakeAggregator,
    condition,
    eventually,
    job_manifest,
    kmock_cluster,
    operator_settings,
    running_operator,
)

URL = "https://fl.example.org"


class StatusRequestHeld(httpx.AsyncBaseTransport):
    """The fake aggregator; once armed, the next job-status request waits for `during` first."""

    def __init__(self, fake: FakeAggregator) -> None:
        self.fake = fake
        self.during: Callable[[], Awaitable[None]] | None = None
        self.held = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        during, is_status = self.during, request.method == "GET" and request.url.path.endswith("/jobs/demo")
        if during is not None and is_status:
            self.during = None
            await during()
            self.held.set()
        return self.fake.handle(request)


async def url_published_while_a_poll_waits() -> None:
    fake = FakeAggregator()
    transport = StatusRequestHeld(fake)
    settings = operator_settings(resync_seconds=300)  # no resync to repair what the poll would undo
    async with kmock_cluster() as cluster, running_operator(cluster, fake, settings, transport):
        await cluster.create_job(job_manifest())  # silo c is external, and no URL is published yet

        async def running_without_url() -> bool:
            status = ((await cluster.job()) or {}).get("status") or {}
            ready = await condition(cluster, "ExternalSilosReady")
            return status.get("phase") == "Running" and ready.get("reason") == "ExternalUrlMissing"

        await eventually(running_without_url, "Running, ExternalSilosReady=False ExternalUrlMissing")

        async def published() -> dict[str, Any] | None:
            found = await condition(cluster, "ExternalSilosReady")
            return found if found.get("reason") == "UrlPublished" else None

        async def publish_the_url() -> None:
            """While the poll waits for the aggregator: the URL is published, and kopf has long since
            delivered that status to the poll's live body when the aggregator answers."""
            annotation = {"metadata": {"annotations": {"fedsilo.io/external-url": URL}}}
            await cluster.kube.patch(*JOB_API, NS, "demo", annotation)
            await eventually(published, "ExternalSilosReady=True UrlPublished")
            await asyncio.sleep(1.0)

        transport.during = publish_the_url
        await asyncio.wait_for(transport.held.wait(), TIMEOUT)  # a poll held while the URL was published
        await asyncio.sleep(1.5)  # that poll's write, and a few more polls
        found = await condition(cluster, "ExternalSilosReady")
        assert (found["status"], found["reason"]) == ("True", "UrlPublished"), found
        status = ((await cluster.job()) or {})["status"]
        assert status["externalSilos"][0]["aggregatorUrl"] == URL
        # Not even for a moment (the external-url handler would publish it again at once).
        assert cluster.emulator is not None
        written = external_ready_writes(cluster.emulator)
        assert "ExternalUrlMissing" not in written[written.index("UrlPublished"):], written


def external_ready_writes(emulator: kmock.KubernetesEmulator) -> list[str]:
    """The ExternalSilosReady reason of every status write of the job, in order."""
    reasons = []
    for request in emulator[kmock.resource("fedsilo.io/v1alpha1/federatedjobs")]:
        status = request.data.get("status") if request.method == "PATCH" and isinstance(request.data, dict) else None
        for found in (status or {}).get("conditions") or []:
            if found.get("type") == "ExternalSilosReady":
                reasons.append(found["reason"])
    return reasons


def test_a_poll_never_writes_back_a_condition_changed_while_it_waited() -> None:
    asyncio.run(url_published_while_a_poll_waits())
