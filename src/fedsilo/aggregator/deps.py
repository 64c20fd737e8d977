"""What the routes share: who is calling (admin, silo, metrics reader), the engine, path types.

Authentication happens here, before a route's body runs, except where a route checks the
silo's token in its own read (`silo_token`: the task long-poll, one thread hop per poll).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedsilo.adapters import sha256
from fedsilo.aggregator import guards
from fedsilo.aggregator.peer import require_silo_cert
from fedsilo.aggregator.rounds import Engine
from fedsilo.api import models as m

bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
SAFETENSORS = {"content": {m.SAFETENSORS_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}


class ApiError(Exception):
    """A refusal raised by the HTTP layer itself (authentication, body size)."""

    def __init__(self, status: int, detail: str, reason: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.reason = status, detail, reason


def _same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison that also copes with non-ASCII input (compare digests)."""
    return hmac.compare_digest(sha256(given.encode("utf-8", "surrogatepass")), sha256(expected.encode()))


async def get_engine(request: Request) -> Engine:  # no I/O: `async`, so no thread-pool hop (see guards.checked_names)
    return request.app.state.engine  # type: ignore[no-any-return]


EngineDep = Annotated[Engine, Depends(get_engine)]


def _is_admin(request: Request, creds: HTTPAuthorizationCredentials | None) -> bool:
    return creds is not None and _same_secret(creds.credentials, request.app.state.settings.admin_token)


async def require_admin(request: Request, creds: Credentials) -> None:
    if not _is_admin(request, creds):
        raise ApiError(401, "admin token required", "unauthorized")


async def require_metrics_reader(request: Request, creds: Credentials) -> None:
    """The admin or the metrics reader (Prometheus): /metrics holds per-silo loss and example counts."""
    reader: str | None = request.app.state.settings.metrics_token
    if _is_admin(request, creds) or (creds is not None and reader and _same_secret(creds.credentials, reader)):
        return
    raise ApiError(401, "metrics reader or admin token required", "unauthorized")


async def silo_token(job: str, silo: str, request: Request, creds: Credentials) -> str:
    """A silo's bearer token, after the checks that need no store (its presence, the client certificate).
    The task route checks the token itself, in the same session as its read: a poll costs one thread hop."""
    if creds is None:
        raise ApiError(401, "silo token required", "unauthorized")
    require_silo_cert(request, job, silo)
    return creds.credentials


SiloToken = Annotated[str, Depends(silo_token)]


def require_silo(job: str, silo: str, engine: EngineDep, token: SiloToken) -> None:
    """`silo_token`, then the token checked against the store."""
    engine.authenticate(job, silo, token)


def require_reader(
    job: str,
    request: Request,
    engine: EngineDep,
    creds: Credentials,
    x_fedsilo_silo: Annotated[str | None, Header()] = None,
) -> str | None:
    """The admin (None), or a silo of this job naming itself in X-Fedsilo-Silo (its name: it reads its slice)."""
    if _is_admin(request, creds):
        return None
    if creds is None or x_fedsilo_silo is None:
        raise ApiError(401, "admin token, or silo token with X-Fedsilo-Silo, required", "unauthorized")
    require_silo_cert(request, job, x_fedsilo_silo)
    engine.authenticate(job, x_fedsilo_silo, creds.credentials)
    return x_fedsilo_silo


Admin = Depends(require_admin)
Silo = Depends(require_silo)
Reader = Depends(require_reader)
Caller = Annotated[str | None, Reader]  # None: the admin; else the silo reading

Names = Depends(guards.checked_names)  # before any other dependency: no malformed name reaches the store
Version = Annotated[int, Path(ge=0, le=m.MAX_INT)]
Round = Annotated[int, Path(ge=0, le=m.MAX_INT)]


