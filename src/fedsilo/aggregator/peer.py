"""Mutual TLS: the client certificate reaches the app, and silo routes check who it names.

Uvicorn keeps the peer certificate on the TLS transport and does not put it in the
ASGI scope, so `protocol()` returns uvicorn's HTTP protocol with one addition: after the
handshake it adds the ASGI TLS extension, `scope["extensions"]["tls"]["client_cert_chain"]`
(PEM, leaf first), to every request on that connection.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from fedsilo.aggregator.errors import Forbidden
from fedsilo.tls import silo_identity_pem


def _with_peer_cert(app: ASGIApp, pem: str) -> ASGIApp:
    async def app_with_peer_cert(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [pem]}
        await app(scope, receive, send)

    return app_with_peer_cert


def protocol() -> type[asyncio.Protocol]:
    """Uvicorn's default HTTP protocol class, passing each connection's verified client certificate on."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class PeerCertProtocol(Base):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der:  # the handshake verified it against the client CA
                self.app = _with_peer_cert(self.app, ssl.DER_cert_to_PEM_cert(der))

    return PeerCertProtocol


def require_silo_cert(request: Request, job: str, silo: str | None) -> None:
    """With mutual TLS on, refuse (403) a request whose client certificate is not silo `silo` of `job`."""
    if request.app.state.settings.tls_client_ca_file is None:
        return
    tls: dict[str, Any] = request.scope.get("extensions", {}).get("tls", {})
    chain = tls.get("client_cert_chain")
    if not chain:
        raise Forbidden("a silo's client certificate is required (mutual TLS)", "client_cert_required")
    identity = silo_identity_pem(chain[0])
    if identity != (job, silo):
        named = f"silo {identity[1]!r} of job {identity[0]!r}" if identity else "no fedsilo silo"
        raise Forbidden(f"the client certificate names {named}, not silo {silo!r} of job {job!r}", "wrong_silo_cert")
