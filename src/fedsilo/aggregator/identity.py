"""Silo identity: who a bearer token belongs to, and the token's lifecycle.

A silo's token is stored only as a SHA-256 hash and compared in constant time on those
digests (any bytes hash: a non-ASCII token is a 401, never a 500). Rotation installs a
new token and keeps the previous one valid for a grace period, so a silo that has not
picked up its new Secret yet keeps working; revocation refuses both at once; a token
may carry an expiry. Plain functions over a `SiloRow` inside the caller's transaction.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from fedsilo.adapters import sha256
from fedsilo.aggregator.errors import Invalid, Unauthorized
from fedsilo.aggregator.store import SiloRow, aware

Role = Literal["trainer", "evaluator"]
MIN_TOKEN_LENGTH = 16


def token_hash(token: str) -> str:
    """What the store keeps of a token."""
    return sha256(token.encode("utf-8", "surrogatepass"))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check_token(token: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH:
        raise Invalid(f"a silo token must have at least {MIN_TOKEN_LENGTH} characters", "invalid_token")


def _matches(stored: str | None, given_hash: str) -> bool:
    return stored is not None and hmac.compare_digest(stored, given_hash)


def verify(row: SiloRow | None, token: str, now: datetime) -> Role:
    """The role of the silo `token` belongs to, or `Unauthorized` saying why not."""
    given = token_hash(token)
    # compare against something even for an unknown silo: no timing hint of which silos exist
    current = _matches(row.token_hash if row is not None else "0" * 64, given)
    if row is None or not (current or _in_grace(row, given, now)):
        raise Unauthorized("invalid silo token")
    if row.revoked_at is not None:
        raise Unauthorized(f"silo {row.name!r} was removed from job {row.job!r}", "revoked")
    if row.token_revoked_at is not None:
        raise Unauthorized(f"the token of silo {row.name!r} was revoked; ask the job's admin for a new one", "revoked")
    expires = aware(row.token_expires_at)
    if current and expires is not None and now >= expires:
        raise Unauthorized(f"the token of silo {row.name!r} expired at {expires.isoformat()}", "expired")
    return row.role  # type: ignore[return-value]


def _in_grace(row: SiloRow, given: str, now: datetime) -> bool:
    until = aware(row.previous_valid_until)
    return until is not None and now < until and _matches(row.previous_token_hash, given)


@dataclass(frozen=True)
class Rotation:
    """A rotation's outcome: the new token and until when the old one is still accepted."""

    token: str
    previous_valid_until: datetime | None
    expires_at: datetime | None
    changed: bool


def rotate(row: SiloRow, token: str | None, grace: timedelta, expires_in: timedelta | None, now: datetime) -> Rotation:
    """Install `token` (or a generated one); the current one stays valid for `grace`.

    Idempotent when the caller names the token: sending the same rotation again changes
    nothing (an operator that retries does not cut its own grace period short).
    """
    token = token if token is not None else new_token()
    check_token(token)
    digest = token_hash(token)
    expires_at = now + expires_in if expires_in is not None else None
    if _matches(row.token_hash, digest) and row.token_revoked_at is None:
        if expires_in is not None:
            row.token_expires_at = expires_at
        return Rotation(token, aware(row.previous_valid_until), aware(row.token_expires_at), changed=False)
    revoked = row.token_revoked_at is not None
    row.previous_token_hash = None if revoked else row.token_hash
    row.previous_valid_until = None if revoked or grace <= timedelta(0) else now + grace
    row.token_hash, row.token_expires_at, row.token_revoked_at = digest, expires_at, None
    return Rotation(token, aware(row.previous_valid_until), expires_at, changed=True)


def revoke(row: SiloRow, now: datetime) -> None:
    """Refuse the silo's current and previous token from now on (a rotation issues a new one)."""
    row.token_revoked_at = row.token_revoked_at or now
    row.previous_token_hash, row.previous_valid_until = None, None


def readmit(row: SiloRow, token: str) -> None:
    """A silo added back to a job: a new token and a clean identity record."""
    row.token_hash, row.revoked_at = token_hash(token), None
    row.previous_token_hash = row.previous_valid_until = row.token_expires_at = row.token_revoked_at = None
