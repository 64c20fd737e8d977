"""A local run's throwaway certificates: HTTPS (and mutual TLS) on loopback, as in a cluster."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedsilo import tls

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class RunCertificates:
    """Where a run's certificates lie: `ca.crt`, `server.{crt,key}` and `<silo>.{crt,key}` in one folder."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server(self) -> tuple[Path, Path]:
        return self.folder / "server.crt", self.folder / "server.key"

    def silo(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"silo-{name}.crt", self.folder / f"silo-{name}.key"


def create(folder: Path, job: str, silos: Iterable[str]) -> RunCertificates:
    """A new CA for this run only (its key is never written), a loopback server certificate and
    one client certificate per silo (mutual TLS)."""
    ca = tls.create_ca(f"fedsilo local run of {job}")
    certs = RunCertificates(folder)
    folder.mkdir(parents=True, exist_ok=True)
    certs.ca.write_bytes(ca.cert_pem())
    tls.write(tls.issue_server(ca, LOOPBACK), *certs.server)
    for silo in silos:
        tls.write(tls.issue_silo(ca, job, silo), *certs.silo(silo))
    return certs
