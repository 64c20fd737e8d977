"""TLS everywhere: certificates (pure), then real handshakes with a real aggregator process.

Refused: a server certificate from another CA or expired, plain HTTP, and with mutual TLS
a silo route called without a client certificate, with another silo's or another job's,
one signed by a foreign CA or expired.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from tests.aggregator.conftest import AggregatorProcess, silo_cert, tls_folder
from tests.conftest import job_document

from fedsilo import tls
from fedsilo.aggregator.settings import AggregatorSettings
from fedsilo.api import models as m
from fedsilo.api.client import Client, ClientError
from fedsilo.local import certificates, remote
from fedsilo.local.runner import free_port
from fedsilo.spec import parse_job

TOKENS = {name: f"{name}-token-0123456789" for name in ("alpha", "beta")}
LONG_AGO = datetime.now(UTC) - timedelta(days=30)


# ---- certificates ------------------------------------------------------------------------


def test_the_ca_signs_a_server_and_a_silo_certificate_that_say_who_they_are() -> None:
    ca = tls.create_ca()
    server = tls.issue_server(ca, ["aggregator.demo.svc", "127.0.0.1"])
    silo = tls.issue_silo(ca, "demo", "alpha")
    for leaf in (server, silo):
        leaf.cert.verify_directly_issued_by(ca.cert)
    sans = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["aggregator.demo.svc"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert tls.silo_identity(silo.cert) == ("demo", "alpha")
    assert tls.silo_identity(server.cert) is None  # a server certificate identifies no silo
    assert tls.silo_identity(ca.cert) is None
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_certificates_and_keys_round_trip_and_keys_are_private(tmp_path: Path) -> None:
    silo = tls.issue_silo(tls.create_ca(), "demo", "beta", days=2)
    tls.write(silo, tmp_path / "silo.crt", tmp_path / "silo.key")
    assert stat.S_IMODE(os.stat(tmp_path / "silo.key").st_mode) == 0o600
    back = tls.load(tmp_path / "silo.crt", tmp_path / "silo.key")
    assert back.cert == silo.cert and back.key.private_numbers() == silo.key.private_numbers()
    assert tls.silo_identity_pem((tmp_path / "silo.crt").read_text()) == ("demo", "beta")
    lifetime = silo.cert.not_valid_after_utc - silo.cert.not_valid_before_utc
    assert timedelta(days=2) - lifetime == timedelta(0)


def test_plain_http_only_by_an_explicit_setting(tmp_path: Path) -> None:
    base = {"admin_token": "admin-token-0123456789"}
    assert "FEDSILO_TLS_CERT_FILE" in (AggregatorSettings(**base).tls_problem() or "")
    assert AggregatorSettings(**base, insecure_http=True).tls_problem() is None
    files = {"tls_cert_file": tmp_path / "s.crt", "tls_key_file": tmp_path / "s.key"}
    assert AggregatorSettings(**base, **files).tls_problem() is None
    assert AggregatorSettings(**base, **files, insecure_http=True).tls_problem()  # one or the other
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSILO_")}
    refused = subprocess.run(
        [sys.executable, "-m", "fedsilo", "aggregator"],
        capture_output=True,
        text=True,
        env={**env, "FEDSILO_ADMIN_TOKEN": base["admin_token"]},
        timeout=120,
        cwd=tmp_path,
    )
    assert refused.returncode != 0
    assert "serves HTTPS only" in refused.stderr and "FEDSILO_INSECURE_HTTP" in refused.stderr


# ---- real handshakes ---------------------------------------------------------------------


def _process(folder: Path, tls_dir: Path, *, mutual: bool = False, probe_verify: bool = True) -> AggregatorProcess:
    return AggregatorProcess(
        f"https://127.0.0.1:{free_port()}",
        secrets.token_urlsafe(24),
        f"sqlite:///{folder / 'fedsilo.db'}",
        folder / "checkpoints",
        folder / "aggregator.log",
        tls=tls_dir,
        mutual=mutual,
        probe_verify=probe_verify,
    )


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AggregatorProcess]:
    """One aggregator with mutual TLS serving job `demo` (silos alpha and beta)."""
    folder = tmp_path_factory.mktemp("mtls")
    agg = _process(folder, tls_folder(folder / "tls"), mutual=True)
    agg.start()
    admin = Client(agg.url, "demo", agg.admin, retries=0, ca_bundle=agg.ca)
    admin.create_job(parse_job(job_document()), TOKENS)  # the admin needs no client certificate
    admin.close()
    yield agg
    agg.stop()


def _silo(agg: AggregatorProcess, silo: str, cert: tuple[Path, Path] | None, ca: Path | None = None) -> Client:
    return Client(agg.url, "demo", TOKENS[silo], silo, retries=0, ca_bundle=ca or agg.ca, client_cert=cert)


def _join(client: Client) -> m.JoinResponse:
    try:
        return client.join(m.JoinRequest(n_train_examples=10, n_eval_examples=2))
    finally:
        client.close()


def test_the_silo_with_its_own_certificate_is_served(mutual: AggregatorProcess) -> None:
    assert mutual.tls is not None
    joined = _join(_silo(mutual, "alpha", silo_cert(mutual.tls, "demo", "alpha")))
    assert joined.role == "trainer"
    reader = _silo(mutual, "beta", silo_cert(mutual.tls, "demo", "beta"))
    assert reader.status().name == "demo"  # a silo's read (X-Fedsilo-Silo) with its certificate


@pytest.mark.parametrize(
    ("cert_of", "reason"),
    [(None, "client_cert_required"), (("demo", "beta"), "wrong_silo_cert"), (("other", "alpha"), "wrong_silo_cert")],
)
def test_a_silo_route_refuses_any_other_identity(
    mutual: AggregatorProcess, cert_of: tuple[str, str] | None, reason: str
) -> None:
    assert mutual.tls is not None
    cert = silo_cert(mutual.tls, *cert_of) if cert_of else None
    with pytest.raises(ClientError) as refused:
        _join(_silo(mutual, "alpha", cert))  # alpha's valid token: the certificate alone is wrong
    assert (refused.value.status, refused.value.reason) == (403, reason)
    reader = _silo(mutual, "alpha", cert)
    with pytest.raises(ClientError) as read:
        reader.status()
    assert read.value.status == 403


def test_client_certificates_from_another_ca_or_expired_fail_the_handshake(
    mutual: AggregatorProcess, tmp_path: Path
) -> None:
    assert mutual.tls is not None
    foreign = silo_cert(tmp_path, "demo", "alpha", ca=tls.create_ca("someone else's CA"))
    expired = silo_cert(mutual.tls, "demo", "alpha", days=1, valid_from=LONG_AGO)
    for cert in (foreign, expired):
        with pytest.raises(httpx.TransportError):
            _join(_silo(mutual, "alpha", cert))


def test_a_server_from_another_ca_is_refused_and_plain_http_does_not_answer(
    mutual: AggregatorProcess, tmp_path: Path
) -> None:
    assert mutual.tls is not None
    other = tls_folder(tmp_path / "other")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        _join(_silo(mutual, "alpha", silo_cert(mutual.tls, "demo", "alpha"), ca=other / "ca.crt"))
    with pytest.raises(httpx.TransportError):
        httpx.get(mutual.url.replace("https://", "http://") + "/healthz", timeout=5)
    assert httpx.get(f"{mutual.url}/healthz", verify=mutual.verify()).status_code == 200  # probes need no cert


def test_a_port_forward_is_verified_under_the_service_name(tmp_path: Path) -> None:
    folder = tls_folder(tmp_path / "tls", hosts=("demo-aggregator.fl.svc",))  # as the operator issues it
    agg = _process(tmp_path, folder, probe_verify=False)
    agg.start()
    try:
        plain = Client(agg.url, "demo", agg.admin, retries=0, ca_bundle=agg.ca)
        with pytest.raises(httpx.ConnectError, match="IP address mismatch"):  # 127.0.0.1 is not its name
            plain.create_job(parse_job(job_document()), TOKENS)
        named = Client(agg.url, "demo", agg.admin, retries=0, ca_bundle=agg.ca, server_name="demo-aggregator.fl.svc")
        named.create_job(parse_job(job_document()), TOKENS)
        target = remote.Target(agg.url, "demo", agg.admin, agg.ca, server_name="demo-aggregator.fl.svc")
        assert remote.snapshot(target).status.name == "demo"
    finally:
        agg.stop()


def test_an_expired_server_certificate_is_refused(tmp_path: Path) -> None:
    folder = tls_folder(tmp_path / "tls", server_days=1, server_valid_from=LONG_AGO)
    agg = _process(tmp_path, folder, probe_verify=False)
    agg.start()
    try:
        with pytest.raises(httpx.ConnectError, match="certificate has expired"):
            httpx.get(f"{agg.url}/healthz", verify=tls.client_context(agg.ca))
    finally:
        agg.stop()


def test_a_local_run_gets_its_own_ca_a_loopback_server_and_one_certificate_per_silo(tmp_path: Path) -> None:
    certs = certificates.create(tmp_path / "tls", "demo", ["alpha", "beta"])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    assert not (tmp_path / "tls" / "ca.key").exists()  # throwaway: nothing can sign for this run later
    server = tls.load(*certs.server).cert
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    for silo in ("alpha", "beta"):
        cert, key = certs.silo(silo)
        assert tls.silo_identity(tls.load(cert, key).cert) == ("demo", silo)
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
