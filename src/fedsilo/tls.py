"""Certificates for HTTPS between fedsilo's processes, as pure functions on `cryptography`.

A CA signs the aggregator's server certificate and, for mutual TLS, one client
certificate per silo. A silo certificate names its job and silo in a SAN URI
`fedsilo://<job>/<silo>` (the CN repeats it for people): the aggregator reads the
identity from there and checks it against the silo in the request's URL.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "Issued",
    "client_context",
    "create_ca",
    "issue_server",
    "issue_silo",
    "load",
    "silo_identity",
    "silo_identity_pem",
    "silo_uri",
    "write",
]

SCHEME = "fedsilo"
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> Issued:
        """A certificate and its (unencrypted EC) key from PEM."""
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("expected an EC private key")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: float, valid_from: datetime | None
) -> x509.CertificateBuilder:
    start = (valid_from or datetime.now(UTC)) - timedelta(minutes=5)  # tolerate small clock skew
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + days * DAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def create_ca(common_name: str = "fedsilo CA", days: float = 3650, valid_from: datetime | None = None) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key, days, valid_from)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(
    ca: Issued,
    subject: str,
    names: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: float,
    valid_from: datetime | None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(subject, ca.cert.subject, key, days, valid_from)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue_server(ca: Issued, hosts: Sequence[str], days: float = 365, valid_from: datetime | None = None) -> Issued:
    """A server certificate for `hosts`: DNS names, or IP addresses (which become IP SANs)."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return _leaf(ca, hosts[0], names, ExtendedKeyUsageOID.SERVER_AUTH, days, valid_from)


def silo_uri(job: str, silo: str) -> str:
    return f"{SCHEME}://{job}/{silo}"


def issue_silo(ca: Issued, job: str, silo: str, days: float = 365, valid_from: datetime | None = None) -> Issued:
    """A client certificate that identifies silo `silo` of job `job` (SAN URI `fedsilo://job/silo`)."""
    uri = silo_uri(job, silo)
    return _leaf(
        ca, f"{job}/{silo}", [x509.UniformResourceIdentifier(uri)], ExtendedKeyUsageOID.CLIENT_AUTH, days, valid_from
    )


def silo_identity(cert: x509.Certificate) -> tuple[str, str] | None:
    """(job, silo) from the certificate's `fedsilo://job/silo` SAN URI; None if it names none (or several)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    found = set()
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        scheme, _, rest = uri.partition("://")
        job, _, silo = rest.partition("/")
        if scheme == SCHEME and job and silo and "/" not in silo:
            found.add((job, silo))
    return found.pop() if len(found) == 1 else None


@lru_cache(maxsize=1024)
def silo_identity_pem(pem: str) -> tuple[str, str] | None:
    """`silo_identity` of a PEM certificate (cached: a silo sends the same one on every request)."""
    return silo_identity(x509.load_pem_x509_certificate(pem.encode()))


def write(issued: Issued, cert_file: Path, key_file: Path) -> None:
    """Write the certificate (0644) and the private key (0600, never readable by others, even briefly)."""
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    cert_file.write_bytes(issued.cert_pem())
    key_file.unlink(missing_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(issued.key_pem())


def load(cert_file: Path, key_file: Path) -> Issued:
    """A certificate and key written by `write` (or any PEM EC pair)."""
    return Issued.from_pem(cert_file.read_bytes(), key_file.read_bytes())


def client_context(ca_bundle: Path | None = None, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A client's TLS context: verify the server against `ca_bundle` (default: public CAs) and,
    for mutual TLS, present `cert` = (certificate file, key file)."""
    context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else certifi.where())
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context
