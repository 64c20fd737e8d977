"""Guards against hostile input, applied before any route looks at it.

`BodyGuard` (ASGI middleware) gives every request body a size cap and a read timeout:
a body declared larger than its cap is refused from its Content-Length before a byte of
it is read, one that grows past its cap while streaming is refused at that chunk, and one
that stalls is answered 408 and its connection closed, so a client that declares a body
and sends nothing cannot hold a connection for ever. JSON routes get their whole (small)
body read here, so FastAPI never waits on the socket itself; upload routes stream through.

`checked_names` (a router dependency) refuses malformed job and silo names before the
authentication dependencies look them up in the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedsilo.api import models as m
from fedsilo.spec import DnsLabel

# The largest JSON body: the biggest one is a SecAgg share bundle per roster silo, each at
# most a 63-character name and 1,368 base64 characters (1,024 bytes): ~1.5 KB a silo, so
# 4 MiB holds a round of some 2,800 silos; a FederatedJob document is far smaller.
JSON_LIMIT = 4 * 1024 * 1024
BODY_TIMEOUT = 30.0  # seconds without a byte of the body before it is refused
MIN_RATE = 64 * 1024  # bytes/s: a body may take BODY_TIMEOUT + its size / MIN_RATE in all (no trickling)

Refused = Callable[[Request, int, str, str], None]


class BodyRefused(Exception):
    """The body is too large or too slow; answered with a Problem and the connection closed."""

    def __init__(self, status: int, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.status, self.detail, self.reason = status, detail, reason


class _Body:
    """One request's body as it arrives, metered against its cap and deadlines."""

    def __init__(self, receive: Receive, limit: int, declared: int | None, timeout: float, chunked: bool) -> None:
        self._receive, self.limit, self.timeout = receive, limit, timeout
        self.size = 0
        self.complete = not chunked and not declared  # no body at all, or all of it received
        self.deadline = time.monotonic() + timeout + (declared if declared is not None else limit) / MIN_RATE

    async def receive(self) -> Message:
        """The next body message, or `BodyRefused` once the body outgrows its cap or stalls."""
        if self.complete:  # what follows the body is a disconnect notice, awaited as long as the app likes
            return await self._receive()
        wait = min(self.timeout, self.deadline - time.monotonic())
        try:
            message = await asyncio.wait_for(self._receive(), max(wait, 0.0))
        except TimeoutError:
            detail = f"the request body stalled for {self.timeout:g} s or came slower than {MIN_RATE} bytes/s"
            raise BodyRefused(408, detail, "timeout") from None
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.size > self.limit:
                raise BodyRefused(413, f"the request body exceeds the limit of {self.limit} bytes", "too_large")
        return message

    async def read_all(self) -> list[Message] | None:
        """Every message of the body (at most `limit` bytes), or None when the client went away."""
        messages: list[Message] = []
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                return None
            messages.append(message)
            if not message.get("more_body", False):
                return messages


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared Content-Length, and whether the body comes chunked."""
    headers = dict(scope["headers"])
    length = headers.get(b"content-length", b"")
    return (int(length) if length.isdigit() else None), b"transfer-encoding" in headers


class BodyGuard:
    """ASGI middleware: each request body within its cap and in time, or refused early."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        uploads: Sequence[str],
        upload_limit: int,
        json_limit: int = JSON_LIMIT,
        timeout: float = BODY_TIMEOUT,
        on_refused: Refused | None = None,
    ) -> None:
        """`uploads`: path templates of the routes that stream their (large) body themselves."""
        self.app, self.upload_limit, self.json_limit, self.timeout = app, upload_limit, json_limit, timeout
        self.uploads = [compile_path(path)[0] for path in uploads]
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streaming = any(pattern.match(scope["path"]) for pattern in self.uploads)
        limit = self.upload_limit if streaming else self.json_limit
        declared, chunked = _framing(scope)
        body = _Body(receive, limit, declared, self.timeout, chunked)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body.complete:  # answered before the body was read (a 401, a 413): close, never drain it
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            if declared is not None and declared > limit:  # refused before a byte of it is read
                raise BodyRefused(413, f"a body of {declared} bytes exceeds the limit of {limit}", "too_large")
            if streaming:
                await self.app(scope, body.receive, tracked)
                return
            messages = await body.read_all()
            if messages is None:
                return  # the client is gone: nobody to answer
            await self.app(scope, _replay(messages, receive), tracked)
        except BodyRefused as exc:
            if started:
                raise
            await self._refuse(scope, send, exc)
        except ClientDisconnect:
            pass  # the client hung up mid-upload: nothing to answer

    async def _refuse(self, scope: Scope, send: Send, exc: BodyRefused) -> None:
        if self.on_refused is not None:
            self.on_refused(Request(scope), exc.status, exc.reason, exc.detail)
        content = m.Problem(detail=exc.detail, reason=exc.reason).model_dump_json().encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"connection", b"close"),  # the rest of the body is never read: this connection is done
        ]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that hands out the buffered body, then the real channel (disconnect notices)."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


_NAME: TypeAdapter[Any] = TypeAdapter(DnsLabel)


async def checked_names(request: Request) -> None:
    """Refuse a job or silo name that is not a DNS label (path or X-Fedsilo-Silo) with 422.

    A router dependency, so it runs before the authentication dependencies that look the
    names up: garbage (NUL bytes, 10 KB names) never reaches the database. `async`, as every
    dependency that does no I/O: FastAPI runs a plain `def` one in its thread pool, a hop per
    request for a few microseconds of work.
    """
    given: list[tuple[str, str, str]] = [
        ("path", key, request.path_params[key]) for key in ("job", "silo") if key in request.path_params
    ]
    header = request.headers.get("x-fedsilo-silo")
    if header is not None:
        given.append(("header", "x-fedsilo-silo", header))
    errors: list[dict[str, Any]] = []
    for where, key, value in given:
        try:
            _NAME.validate_python(value)
        except ValidationError as exc:
            errors += [{**error, "loc": (where, key)} for error in exc.errors(include_url=False)]
    if errors:
        raise RequestValidationError(errors)
