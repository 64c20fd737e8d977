"""The aggregator's HTTP surface: `/v1` routes, health probes and `/metrics`.

Routes are thin: authenticate, parse, call the round engine, shape the response. Who may
call what is in `deps.py`, adapter uploads (streamed bodies) in `upload_routes.py`, and
how a long-poll waits in `long_poll.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedsilo.aggregator import guards, logs, openapi, upload_routes
from fedsilo.aggregator.blobs import Blobs
from fedsilo.aggregator.deps import (
    SAFETENSORS,
    Admin,
    ApiError,
    Caller,
    EngineDep,
    Names,
    Reader,
    Round,
    Silo,
    SiloToken,
    Version,
    require_admin,
    require_metrics_reader,
    require_reader,
    require_silo,
    silo_token,
)
from fedsilo.aggregator.errors import (
    Conflict,
    EngineError,
    Fenced,
    Forbidden,
    Invalid,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from fedsilo.aggregator.long_poll import long_poll
from fedsilo.aggregator.metrics import Metrics
from fedsilo.aggregator.notify import Changes
from fedsilo.aggregator.rounds import Engine
from fedsilo.aggregator.settings import AggregatorSettings
from fedsilo.aggregator.store import make_sessions
from fedsilo.api import models as m
from fedsilo.logfmt import event

log = logging.getLogger("fedsilo.aggregator")
# Domain error -> HTTP status; the most specific class wins (TooLarge before Invalid).
STATUS: tuple[tuple[type[EngineError], int], ...] = (
    (NotFound, 404),
    (Unauthorized, 401),
    (Forbidden, 403),
    (TooLarge, 413),
    (Invalid, 422),
    (Conflict, 409),
    (Unavailable, 503),
)


jobs = APIRouter(prefix=f"{m.API_PREFIX}/jobs", tags=["jobs"], dependencies=[Names])
silos = APIRouter(prefix=f"{m.API_PREFIX}/jobs/{{job}}", tags=["silos"], dependencies=[Names])

@jobs.post("", status_code=201, dependencies=[Admin])
def create_job(body: m.CreateJob, engine: EngineDep, response: Response) -> m.JobCreated:
    created = engine.create_job(body.job, body.silo_tokens)
    response.status_code = 201 if created.created else 200
    if created.created:
        spec = body.job.spec
        event(log, "job_created", job=created.name, silos=len(spec.silos), rounds=spec.training.rounds)
    return created


@jobs.get("/{job}")
def get_job(job: str, engine: EngineDep, caller: Caller) -> m.JobStatus:
    return engine.status(job, caller)


@jobs.patch("/{job}", dependencies=[Admin])
def patch_job(job: str, body: m.PatchJob, engine: EngineDep) -> m.JobStatus:
    status = engine.patch_job(job, body)
    changed = ",".join(k for k in ("rounds", "resume", "job") if getattr(body, k))
    event(log, "job_patched", job=job, changed=changed or "nothing", phase=status.phase, rounds=status.rounds)
    return status


@jobs.get("/{job}/spec")
def get_spec(job: str, engine: EngineDep, caller: Caller) -> dict[str, object]:
    return engine.document(job, caller)


@jobs.get("/{job}/rounds")
def get_rounds(job: str, engine: EngineDep, caller: Caller) -> list[m.RoundInfo]:
    return engine.history(job, caller)


@jobs.get("/{job}/evaluations", dependencies=[Reader])
def get_evaluations(job: str, engine: EngineDep) -> list[dict[str, object]]:
    return engine.evaluations(job)


@jobs.get("/{job}/adapters/{version}", dependencies=[Reader], responses={200: SAFETENSORS})
def get_adapter(
    job: str, version: Version, engine: EngineDep, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
    data, digest = engine.adapter(job, version)
    etag = f'"{digest}"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(data, media_type=m.SAFETENSORS_MEDIA_TYPE, headers={"ETag": etag})


@silos.post("/silos/{silo}/token", dependencies=[Admin], tags=["identity"])
def rotate_token(job: str, silo: str, body: m.RotateToken, engine: EngineDep) -> m.TokenIssued:
    """A new token for the silo; the old one keeps working for `grace_seconds` (then 401)."""
    issued = engine.rotate_token(job, silo, body)
    event(log, "token_rotated", job=job, silo=silo, changed=issued.rotated,
          previous_valid_until=issued.previous_valid_until, expires_at=issued.expires_at)
    return issued


@silos.delete("/silos/{silo}/token", status_code=204, dependencies=[Admin], tags=["identity"])
def revoke_token(job: str, silo: str, engine: EngineDep) -> Response:
    """Refuse the silo's tokens (current and previous) at once; a rotation issues a new one."""
    engine.revoke_token(job, silo)
    event(log, "token_revoked", logging.WARNING, job=job, silo=silo)
    return Response(status_code=204)


@silos.post("/silos/{silo}/join", dependencies=[Silo])
def join(job: str, silo: str, body: m.JoinRequest, engine: EngineDep) -> m.JoinResponse:
    joined = engine.join(job, silo, body)
    event(log, "join", job=job, silo=silo, role=joined.role, train_examples=body.n_train_examples,
          eval_examples=body.n_eval_examples, device=body.device)
    return joined


@silos.get("/silos/{silo}/task")
async def task(
    job: str,
    silo: str,
    engine: EngineDep,
    request: Request,
    token: SiloToken,
    wait: Annotated[
        float, Query(ge=0, le=30, description="Long-poll: hold up to this many seconds while the task is `wait`.")
    ] = 0,
) -> m.Task:
    """The silo's next task. With `wait`, the answer comes as soon as it is not `wait` (no write per poll)."""
    changes: Changes = request.app.state.changes

    def read() -> m.Task:  # every read checks the token: a revocation also ends a wait
        return engine.task(job, silo, token)

    return await long_poll(changes, job, request, wait, read, lambda a: a.action != "wait")


@silos.post("/silos/{silo}/metrics", status_code=204, dependencies=[Silo])
def post_metrics(job: str, silo: str, body: m.MetricsReport, engine: EngineDep) -> Response:
    engine.submit_metrics(job, silo, body)
    event(log, "metrics", job=job, silo=silo, version=body.version, split=body.split, loss=body.loss,
          accuracy=body.accuracy, examples=body.n_examples)
    return Response(status_code=204)


@silos.get("/rounds/{round}/secagg/{silo}", dependencies=[Silo])
async def secagg_view(
    job: str,
    round: Round,
    silo: str,
    engine: EngineDep,
    request: Request,
    after: Annotated[m.SecAggStage | None, Query(description="Long-poll: answer once the stage is not this.")] = None,
    wait: Annotated[float, Query(ge=0, le=30, description="Long-poll: hold up to this many seconds.")] = 0,
) -> m.SecAggView:
    """A secure round's stage, key roster, this silo's share inbox and the survivors (see `secure.py`)."""
    # a waiting silo re-reads only the stage (one row) after each change, not its whole view
    changes: Changes = request.app.state.changes
    await long_poll(changes, job, request, wait, lambda: engine.secagg_stage(job, round), lambda stage: stage != after)
    return await asyncio.to_thread(engine.secagg_view, job, silo, round)


@silos.put("/rounds/{round}/secagg/{silo}/keys", status_code=204, dependencies=[Silo])
def secagg_keys(job: str, round: Round, silo: str, body: m.SecAggKeys, engine: EngineDep) -> Response:
    engine.secagg_keys(job, silo, round, body)
    event(log, "secagg_keys", job=job, round=round, silo=silo)
    return Response(status_code=204)


@silos.put("/rounds/{round}/secagg/{silo}/shares", status_code=204, dependencies=[Silo])
def secagg_shares(job: str, round: Round, silo: str, body: m.SecAggShares, engine: EngineDep) -> Response:
    engine.secagg_shares(job, silo, round, body)
    event(log, "secagg_shares", job=job, round=round, silo=silo)
    return Response(status_code=204)


@silos.put("/rounds/{round}/secagg/{silo}/reveal", status_code=204, dependencies=[Silo])
def secagg_reveal(job: str, round: Round, silo: str, body: m.SecAggReveal, engine: EngineDep) -> Response:
    engine.secagg_reveal(job, silo, round, body)
    event(log, "secagg_reveal", job=job, round=round, silo=silo)
    return Response(status_code=204)


# Refusals that are part of normal operation: a late upload (info), a retry-later answer (debug).
ROUTINE = {"wrong_round": logging.INFO, "stale": logging.INFO, "duplicate": logging.INFO}


def refused(request: Request, status: int, reason: str | None, detail: str) -> None:
    """One `event=refused` line per 4xx/5xx answer: who asked for what, and why it was refused."""
    level = logging.DEBUG if status == 503 else ROUTINE.get(reason or "", logging.WARNING)
    params = request.path_params
    event(log, "refused", level, status=status, reason=reason, method=request.method, path=request.url.path,
          job=params.get("job"), silo=params.get("silo") or request.headers.get("x-fedsilo-silo"),
          detail=detail[:300])


def create_app(settings: AggregatorSettings) -> FastAPI:
    """Build the app: store, blobs, engine and metrics are created here, once."""
    metrics = Metrics(per_silo=settings.per_silo_metrics)
    engine = Engine(
        make_sessions(settings.database_url),
        Blobs(settings.checkpoint_dir / "blobs"),
        metrics,
        lease_seconds=settings.lease_seconds,
        ingest_slots=settings.ingest_slots,
    )
    changes = Changes(engine.sessions, on_waiting=lambda job, n: metrics.long_polls_waiting.labels(job).inc(n))
    engine.on_changed = changes.committed
    startup: dict[str, Any] = {"ready": settings.job_file is None}
    watch = logs.RoundWatch(engine, every=0.0)  # called only when a job's fingerprint moved (ticker)

    def ensure() -> None:
        """Create or resume the job of FEDSILO_JOB_FILE; waits (not ready) while another aggregator serves it."""
        if startup["ready"] or settings.job_file is None:
            return
        document = yaml.safe_load(settings.job_file.read_text())
        tokens = json.loads(settings.silo_tokens_file.read_text()) if settings.silo_tokens_file else {}
        try:
            engine.ensure_job(document, tokens)
        except Fenced as exc:
            if not startup.get("told"):
                log.warning("%s", exc.detail)
                startup["told"] = True
            return
        except EngineError as exc:  # serve the stored job rather than crash-loop on a bad file
            log.error("FEDSILO_JOB_FILE cannot be applied to the stored job: %s", exc.detail)
        startup["ready"] = True
        engine.sweep()

    ensure()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            swept, watched = time.monotonic(), None
            while True:
                await asyncio.to_thread(engine.wakeup.wait, settings.tick_seconds)
                engine.wakeup.clear()
                try:
                    await asyncio.to_thread(ensure)
                    await asyncio.to_thread(engine.renew_leases)
                    await asyncio.to_thread(engine.tick)  # isolates jobs from each other
                    await asyncio.to_thread(engine.write_polls)
                    # round and phase events into the log; reading a 1,000-silo job's status every
                    # tick cost more than 1,000 idle silos: only when phase, round or version moved
                    fingerprints = await asyncio.to_thread(changes.read)
                    if fingerprints != watched:
                        await asyncio.to_thread(watch)
                        watched = fingerprints
                    if time.monotonic() - swept > 300:
                        swept = time.monotonic()
                        await asyncio.to_thread(engine.sweep)
                except Exception:  # the store is unreachable: keep trying, never stop ticking
                    log.exception("tick failed")

        changes.bind(asyncio.get_running_loop())
        tasks = [asyncio.create_task(ticker()), asyncio.create_task(changes.watch())]
        yield
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            engine.release_leases()

    # no public /docs: the OpenAPI document is served to the admin only (below)
    app = FastAPI(
        title="fedsilo aggregator", version="v1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.settings = settings
    app.state.settings_limit = 1024 * 1024 * 1024  # hard ceiling; each job's own limit is checked after
    app.state.engine = engine
    app.state.changes = changes
    app.state.metrics = metrics
    app.include_router(jobs)
    app.include_router(silos)
    app.include_router(upload_routes.uploads)
    routes = [r for r in (*jobs.routes, *silos.routes, *upload_routes.uploads.routes) if isinstance(r, APIRoute)]
    streamed = [r.path for r in routes if "requestBody" in (r.openapi_extra or {})]  # they stream their body
    app.add_middleware(
        guards.BodyGuard,
        uploads=streamed,
        upload_limit=app.state.settings_limit,
        timeout=settings.body_timeout_seconds,
        on_refused=refused,
    )
    auth = {
        require_admin: ("admin",),
        require_silo: ("silo",),
        silo_token: ("silo",),
        require_reader: ("admin", "silo"),
        require_metrics_reader: ("admin", "metrics"),
    }
    app.openapi = lambda: openapi.document(app, routes, auth)  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        refused(request, exc.status, exc.reason, exc.detail)
        return JSONResponse(m.Problem(detail=exc.detail, reason=exc.reason).model_dump(), status_code=exc.status)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        status = next(code for kind, code in STATUS if isinstance(exc, kind))
        refused(request, status, exc.reason, exc.detail)
        headers = {"Retry-After": "1" if exc.reason == "aggregating" else "2"} if status == 503 else None
        body = m.Problem(detail=exc.detail, reason=exc.reason).model_dump()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        lines = [".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in exc.errors()]
        refused(request, 422, "invalid", "; ".join(lines))
        return JSONResponse(m.Problem(detail="; ".join(lines), reason="invalid").model_dump(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown path, wrong method, unreadable body) in the Problem shape too."""
        reason = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        refused(request, exc.status_code, reason, str(exc.detail))
        body = m.Problem(detail=str(exc.detail), reason=reason).model_dump()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> Response:
        engine.job_names()  # the database answers
        if not startup["ready"]:
            return JSONResponse({"status": "waiting for the job's lease"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/openapi.json", tags=["ops"], dependencies=[Admin], include_in_schema=False)
    def openapi_document() -> dict[str, Any]:
        return app.openapi()

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(require_metrics_reader)])
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
