"""Adapter uploads: the initial adapter and round updates, streamed to a staged file as they arrive.

A body is never held in memory whole: `receive_body` writes and hashes it in batches off the
event loop and refuses it at the chunk that crosses the job's limit; the engine then validates
the staged file and adopts it as the update's blob, or removes it (`Engine.submit_update`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Request

from fedsilo.aggregator.acceptance import Incoming
from fedsilo.aggregator.blobs import Staged
from fedsilo.aggregator.deps import SAFETENSORS, ApiError, EngineDep, Names, Round, Silo
from fedsilo.aggregator.rounds import Engine
from fedsilo.api import models as m
from fedsilo.logfmt import event

log = logging.getLogger("fedsilo.aggregator")
WRITE_BATCH = 256 * 1024  # bytes of an upload gathered in memory before one write + hash off the event loop
uploads = APIRouter(prefix=f"{m.API_PREFIX}/jobs/{{job}}", tags=["silos"], dependencies=[Names])


@uploads.put("/silos/{silo}/adapters/0", dependencies=[Silo], openapi_extra={"requestBody": SAFETENSORS})
async def put_initial(job: str, silo: str, request: Request, engine: EngineDep) -> dict[str, str]:
    body = await receive_body(request, engine, job)
    digest = await asyncio.to_thread(engine.put_initial, job, silo, body)  # consumes the staged body
    event(log, "initial_adapter", job=job, silo=silo, bytes=body.size, sha256=digest[:12])
    return {"sha256": digest}


@uploads.put("/rounds/{round}/updates/{silo}", dependencies=[Silo], openapi_extra={"requestBody": SAFETENSORS})
async def put_update(
    job: str,
    round: Round,
    silo: str,
    request: Request,
    engine: EngineDep,
    x_fedsilo_examples: Annotated[int, Header(ge=-m.MAX_INT, le=m.MAX_INT)],  # < 1: the engine's bad_examples
    x_fedsilo_sha256: Annotated[str, Header()],
    x_fedsilo_train_seconds: Annotated[float | None, Header(ge=0, le=m.MAX_SECONDS)] = None,
    x_fedsilo_examples_seen: Annotated[int | None, Header(ge=0, le=m.MAX_INT)] = None,
) -> m.UpdateAccepted:
    body = await receive_body(request, engine, job)
    update = Incoming(
        silo, round, body, x_fedsilo_sha256, x_fedsilo_examples, x_fedsilo_train_seconds, x_fedsilo_examples_seen
    )
    accepted = await asyncio.to_thread(engine.submit_update, job, update)  # consumes the staged body
    event(log, "upload", job=job, round=accepted.round, silo=silo, bytes=body.size, examples=x_fedsilo_examples,
          train_seconds=x_fedsilo_train_seconds, sha256=accepted.sha256[:12],
          outcome="duplicate" if accepted.duplicate else "accepted")
    return accepted



async def receive_body(request: Request, engine: Engine, job: str) -> Staged:
    """Stream at most the job's upload limit into a staged file, hashing as it arrives.

    Refuses at the chunk that crosses the limit instead of storing a flood; the file is
    removed on every way out but success (then the engine owns it). At most `WRITE_BATCH`
    bytes of a body sit in memory: they are written and hashed off the event loop.
    `guards.BodyGuard` already holds every body to the process-wide ceiling and a read timeout.
    """
    limit = min(request.app.state.settings_limit, await asyncio.to_thread(engine.upload_limit, job))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        engine.metrics.updates_rejected.labels(job, "too_large").inc()
        raise ApiError(413, f"payload of {declared} bytes exceeds the limit of {limit}", "too_large")
    receiver = await asyncio.to_thread(engine.blobs.receive)
    try:
        batch: list[bytes] = []
        pending = 0
        async for chunk in request.stream():
            if receiver.size + pending + len(chunk) > limit:
                engine.metrics.updates_rejected.labels(job, "too_large").inc()
                raise ApiError(413, f"payload exceeds the limit of {limit} bytes", "too_large")
            batch.append(chunk)
            pending += len(chunk)
            if pending >= WRITE_BATCH:
                await asyncio.to_thread(receiver.write, b"".join(batch))
                batch, pending = [], 0
        if batch:
            await asyncio.to_thread(receiver.write, b"".join(batch))
        return receiver.finish()
    except BaseException:
        receiver.discard()
        raise


