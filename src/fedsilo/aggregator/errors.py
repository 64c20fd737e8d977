"""Domain errors of the round engine. The HTTP layer maps each kind to a status code.

The engine never speaks HTTP: it raises one of these with a machine-readable `reason`
(the `reason` of the Problem body and of `fedsilo_updates_rejected_total`) and a
sentence for humans. Every refusal leaves the store unchanged.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every refusal; `reason` is stable, `detail` is for people."""

    default_reason = "invalid"

    def __init__(self, detail: str, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason


class NotFound(EngineError):
    default_reason = "not_found"


class Unauthorized(EngineError):
    default_reason = "unauthorized"


class Conflict(EngineError):
    """The request is well-formed but the job's state does not allow it (late, duplicate...)."""

    default_reason = "conflict"


class Invalid(EngineError):
    """The request itself is wrong (bad tensors, bad spec, immutable field)."""

    default_reason = "invalid"


class Unavailable(EngineError):
    """Not now, but soon: the caller should retry (HTTP 503 with Retry-After)."""

    default_reason = "unavailable"


class Fenced(Unavailable):
    """Another aggregator process holds this job's lease: retry later (or elsewhere)."""

    default_reason = "fenced"


class Forbidden(EngineError):
    """The caller is known but may not do this (not sampled, wrong role)."""

    default_reason = "forbidden"


class TooLarge(Invalid):
    default_reason = "too_large"
