"""A real aggregator process (`python -m fedsilo aggregator`) on SQLite or PostgreSQL."""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from fedsilo import tls
from fedsilo.local.runner import free_port

PG_ADMIN_URL = os.environ.get("FEDSILO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def tls_folder(
    folder: Path,
    server_days: float = 30,
    server_valid_from: datetime | None = None,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> Path:
    """A throwaway CA (ca.crt, ca.key) and a server certificate for `hosts` (server.crt, server.key)."""
    ca = tls.create_ca("fedsilo test CA")
    tls.write(ca, folder / "ca.crt", folder / "ca.key")
    server = tls.issue_server(ca, hosts, days=server_days, valid_from=server_valid_from)
    tls.write(server, folder / "server.crt", folder / "server.key")
    return folder


def silo_cert(
    folder: Path,
    job: str,
    silo: str,
    days: float = 30,
    valid_from: datetime | None = None,
    ca: tls.Issued | None = None,
) -> tuple[Path, Path]:
    """A client certificate for silo `silo` of `job`, signed by `ca` (default: the folder's CA)."""
    signer = ca or tls.load(folder / "ca.crt", folder / "ca.key")
    stem = f"{job}.{silo}.{secrets.token_hex(4)}"  # several certificates of one silo can coexist
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    tls.write(tls.issue_silo(signer, job, silo, days=days, valid_from=valid_from), cert, key)
    return cert, key


@dataclass
class AggregatorProcess:
    """`fedsilo aggregator` over HTTPS when `tls` names a `tls_folder`, else over plain HTTP (FEDSILO_INSECURE_HTTP)."""

    url: str
    admin: str
    database_url: str
    checkpoint_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra FEDSILO_* settings
    tls: Path | None = None
    mutual: bool = False  # silo routes require a client certificate signed by the folder's CA
    probe_verify: bool = True  # False: probe readiness without verifying (tests of a bad server certificate)

    @property
    def ca(self) -> Path | None:
        return self.tls / "ca.crt" if self.tls else None

    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx call to this aggregator passes as `verify`."""
        return tls.client_context(self.ca) if self.ca and self.probe_verify else not self.tls

    def tls_env(self) -> dict[str, str]:
        assert self.url.startswith("https://" if self.tls else "http://"), "the URL's scheme must match `tls`"
        if self.tls is None:
            return {"FEDSILO_INSECURE_HTTP": "true"}
        env = {
            "FEDSILO_TLS_CERT_FILE": str(self.tls / "server.crt"),
            "FEDSILO_TLS_KEY_FILE": str(self.tls / "server.key"),
        }
        return {**env, "FEDSILO_TLS_CLIENT_CA_FILE": str(self.ca)} if self.mutual else env

    def start(self) -> None:
        self.start_waiting()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            if httpx.get(f"{self.url}/readyz", timeout=2, verify=self.verify()).status_code == 200:
                return
            time.sleep(0.2)
        raise TimeoutError("aggregator not ready")

    def start_waiting(self) -> None:
        """Start without waiting for readiness (a fenced aggregator is alive but not ready)."""
        env = {
            **os.environ,
            "FEDSILO_ADMIN_TOKEN": self.admin,
            "FEDSILO_DATABASE_URL": self.database_url,
            "FEDSILO_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "FEDSILO_HOST": "127.0.0.1",
            "FEDSILO_PORT": self.url.rsplit(":", 1)[1],
            "FEDSILO_TICK_SECONDS": "0.2",
            **self.tls_env(),
            **self.env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedsilo", "aggregator"],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                httpx.get(f"{self.url}/healthz", timeout=2, verify=self.verify())
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError("aggregator not up")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, the lease is left to expire."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


CREATED: list[str] = []  # databases this test session made; dropped at its end


def postgres_database() -> str:
    """A fresh database on the machine's PostgreSQL server; skip if none answers."""
    name = f"fedsilo_test_{uuid.uuid4().hex[:10]}"
    try:
        engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
    except Exception as exc:  # no server: only then is skipping honest
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    CREATED.append(name)
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_created_databases() -> None:
    """Drop every database `postgres_database` made (aggregators still connected are cut off)."""
    if not CREATED:
        return
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for name in CREATED:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
    CREATED.clear()


@pytest.fixture(params=["sqlite", "postgresql"])
def aggregator(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AggregatorProcess]:
    url = f"sqlite:///{tmp_path / 'fedsilo.db'}" if request.param == "sqlite" else postgres_database()
    agg = AggregatorProcess(
        f"http://127.0.0.1:{free_port()}",
        secrets.token_urlsafe(24),
        url,
        tmp_path / "checkpoints",
        tmp_path / "aggregator.log",
    )
    agg.start()
    yield agg
    agg.stop()
