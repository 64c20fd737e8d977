"""Long-polls: a request waits for its job's next change, not on a timer (see `notify.py`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request

from fedsilo.aggregator.notify import Changes

T = TypeVar("T")


async def long_poll(
    changes: Changes, job: str, request: Request, wait: float, read: Callable[[], T], ready: Callable[[T], bool]
) -> T:
    """`read()` until `ready` or `wait` seconds passed, re-reading only after `job` changed (notify.py).

    Between reads the request sleeps on the job's change event and on the client's disconnect,
    never on a timer: a thousand idle silos cost nothing until something they wait for commits.
    """
    until = time.monotonic() + wait
    ticket = changes.ticket(job)  # before the read: a commit during it wakes us
    value = await asyncio.to_thread(read)
    if ready(value) or wait <= 0:
        return value
    with changes.waiter(job):
        gone = asyncio.ensure_future(_hung_up(request))
        try:
            while (left := until - time.monotonic()) > 0:
                changed = asyncio.ensure_future(ticket.wait())
                done, _ = await asyncio.wait({changed, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if changed not in done:  # the deadline, or nobody is waiting for the answer any more
                    return value
                ticket = changes.ticket(job)
                value = await asyncio.to_thread(read)
                if ready(value):
                    return value
            return value
        finally:
            gone.cancel()


async def _hung_up(request: Request) -> None:
    """Return when the client disconnects: the server's `http.disconnect` message, not a poll.

    A GET's (empty) body comes first; after it, `receive` blocks until the connection closes.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


