"""Bearer tokens of a job: one admin token and one per silo.

A token is generated once: a silo added to the job later gets a new token, a silo removed
from it loses its token (a silo added back gets a new one). Silo tokens change only when the
job asks for a rotation (`rotation.py`); the admin token never does.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedsilo.spec import FederatedJobSpec

ADMIN_KEY = "admin-token"
SILO_TOKENS_KEY = "silo-tokens.json"
TOKEN_KEY = "token"


def new_token() -> str:
    """A fresh random bearer token (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Tokens:
    """The admin token and the silo tokens of one job."""

    admin: str
    silos: dict[str, str] = field(default_factory=dict)

    def secret_data(self) -> dict[str, str]:
        """`data` of the job's tokens Secret (base64 values)."""
        return {
            ADMIN_KEY: encode(self.admin),
            SILO_TOKENS_KEY: encode(json.dumps(self.silos, sort_keys=True)),
        }


def complete_tokens(existing: Tokens | None, spec: FederatedJobSpec) -> Tokens:
    """Tokens for exactly the spec's silos: existing ones kept, added silos' generated,
    removed silos' dropped. The admin token is generated once."""
    admin = existing.admin if existing else new_token()
    old = existing.silos if existing else {}
    silos = {silo.name: old.get(silo.name) or new_token() for silo in spec.silos}
    return Tokens(admin=admin, silos=silos)


def added_silo_tokens(tokens: Tokens, spec: FederatedJobSpec, known: Iterable[str]) -> dict[str, str]:
    """The tokens of the spec's silos that are not in `known` (the silos the aggregator runs)."""
    running = set(known)
    return {s.name: tokens.silos[s.name] for s in spec.silos if s.name not in running}


def tokens_from_secret(secret: dict[str, Any] | None) -> Tokens | None:
    """Read the tokens back from the job's Secret (None when absent or incomplete)."""
    data = (secret or {}).get("data") or {}
    if ADMIN_KEY not in data:
        return None
    silos = json.loads(decode(data[SILO_TOKENS_KEY])) if SILO_TOKENS_KEY in data else {}
    return Tokens(admin=decode(data[ADMIN_KEY]), silos=silos)


def encode(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def decode(value: str) -> str:
    return base64.b64decode(value).decode()
