"""HTTPS in the cluster: who issues the aggregator's certificate and the silos' client certificates.

`spec.aggregator.tls.mode`:
- `operator` (default): the operator's CA lives in Secret `settings.ca_secret` of its own
  namespace (created once). Each job's Secret `<job>-tls` holds `ca.crt`, the aggregator's
  `tls.crt`/`tls.key` (the Service's DNS names, and the public host of `externalUrl`) and,
  with mutual TLS, `silo-<name>.crt`/`.key` per silo. `complete_tls` keeps what is still
  good and re-issues what changed, was added or nears expiry.
- `certManager`: a cert-manager Certificate writes `<job>-tls` (same keys); with mutual TLS
  one Certificate per in-cluster silo writes `<job>-silo-<name>-tls` in the silo's namespace.
- `insecure`: plain HTTP.

The builders are pure; `ensure_ca`, `read_job_tls` and `job_ca` are the API reads and writes.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedsilo import tls
from fedsilo.operator import naming
from fedsilo.operator.kube import KubeClient, KubeError
from fedsilo.operator.settings import OperatorSettings
from fedsilo.spec import FederatedJob, SiloSpec

CA_KEY, CERT_KEY, KEY_KEY = "ca.crt", "tls.crt", "tls.key"
VALID_DAYS = 365
RENEW_BEFORE = timedelta(days=30)
CERT_MANAGER_API = "cert-manager.io/v1"
TLS_DIR = "/etc/fedsilo/tls"
CLIENT_DIR = "/etc/fedsilo/client"


def silo_keys(silo: str) -> tuple[str, str]:
    """Keys of a silo's client certificate and key in `<job>-tls` (operator mode)."""
    return f"silo-{silo}.crt", f"silo-{silo}.key"


@dataclass(frozen=True)
class JobTls:
    """What the manifests need to know of a job's certificates (PEM text)."""

    mode: str = "insecure"
    mutual: bool = False
    data: dict[str, str] = field(default_factory=dict)  # the `<job>-tls` Secret's keys, decoded

    @property
    def scheme(self) -> str:
        return "http" if self.mode == "insecure" else "https"

    @property
    def ca(self) -> str | None:
        return self.data.get(CA_KEY)

    def silo_pair(self, silo: str) -> tuple[str, str] | None:
        cert, key = silo_keys(silo)
        return (self.data[cert], self.data[key]) if cert in self.data and key in self.data else None

    def server_digest(self) -> str:
        """Changes whenever the served certificate does: the aggregator pod restarts to load it."""
        return hashlib.sha256(self.data.get(CERT_KEY, "").encode()).hexdigest()[:16]


def tls_secret_name(job: FederatedJob) -> str:
    return naming.child_name(job.metadata.name, "tls")


def silo_tls_secret_name(job: FederatedJob, silo: SiloSpec) -> str:
    """cert-manager mode: the Secret of a silo's client certificate, in the silo's namespace."""
    return naming.child_name(job.metadata.name, "silo", silo.name, "tls")


def server_hosts(job: FederatedJob, settings: OperatorSettings) -> list[str]:
    """The aggregator Service's DNS names, short to fully qualified, and the public host of externalUrl."""
    name, namespace = naming.aggregator_name(job), naming.job_namespace(job)
    service = f"{name}.{namespace}.svc"
    hosts = [name, f"{name}.{namespace}", service, f"{service}.{settings.cluster_domain}"]
    external = job.spec.aggregator.external_url
    if external and (host := urlparse(external).hostname) and host not in hosts:
        hosts.append(host)
    return hosts


def _fresh(pem: str | None, ca: tls.Issued, now: datetime) -> x509.Certificate | None:
    """The certificate if it was signed by `ca` and is not near expiry, else None."""
    if not pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return None
    return cert if cert.not_valid_after_utc - now > RENEW_BEFORE else None


def _dns_names(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.DNSName))


def complete_tls(
    existing: dict[str, str], job: FederatedJob, settings: OperatorSettings, ca: tls.Issued, now: datetime | None = None
) -> dict[str, str]:
    """The `<job>-tls` data (operator mode): certificates still good are kept, the rest issued anew."""
    now = now or datetime.now(UTC)
    ca_pem = ca.cert_pem().decode()
    data = {CA_KEY: ca_pem}
    hosts = server_hosts(job, settings)
    server = _fresh(existing.get(CERT_KEY), ca, now)
    if server is not None and _dns_names(server) == hosts and existing.get(KEY_KEY):
        data[CERT_KEY], data[KEY_KEY] = existing[CERT_KEY], existing[KEY_KEY]
    else:
        issued = tls.issue_server(ca, hosts, days=VALID_DAYS, valid_from=now)
        data[CERT_KEY], data[KEY_KEY] = issued.cert_pem().decode(), issued.key_pem().decode()
    if job.spec.aggregator.tls.mutual:
        for silo in job.spec.silos:
            cert_key, key_key = silo_keys(silo.name)
            cert = _fresh(existing.get(cert_key), ca, now)
            if cert is not None and existing.get(key_key) and tls.silo_identity(cert) == (job.metadata.name, silo.name):
                data[cert_key], data[key_key] = existing[cert_key], existing[key_key]
            else:
                issued = tls.issue_silo(ca, job.metadata.name, silo.name, days=VALID_DAYS, valid_from=now)
                data[cert_key], data[key_key] = issued.cert_pem().decode(), issued.key_pem().decode()
    return data


def ca_secret(settings: OperatorSettings, ca: tls.Issued) -> dict[str, Any]:
    """The operator's CA, in its own namespace (kubernetes.io/tls)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": settings.ca_secret,
            "namespace": settings.operator_namespace,
            "labels": {"app.kubernetes.io/name": "fedsilo", "app.kubernetes.io/managed-by": naming.MANAGED_BY},
        },
        "type": "kubernetes.io/tls",
        "data": {CERT_KEY: _b64(ca.cert_pem()), KEY_KEY: _b64(ca.key_pem())},
    }


def tls_secret(job: FederatedJob, uid: str, job_tls: JobTls) -> dict[str, Any]:
    """`<job>-tls` in the job's namespace (operator mode)."""
    name = tls_secret_name(job)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": naming.metadata(job, uid, name, naming.job_namespace(job)),
        "type": "Opaque",
        "data": {key: _b64(value.encode()) for key, value in sorted(job_tls.data.items())},
    }


def _certificate(job: FederatedJob, uid: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    issuer = job.spec.aggregator.tls.issuer_ref
    assert issuer is not None  # the spec requires it in certManager mode
    spec["issuerRef"] = {"name": issuer.name, "kind": issuer.kind, "group": issuer.group}
    spec["privateKey"] = {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
    return {
        "apiVersion": CERT_MANAGER_API,
        "kind": "Certificate",
        "metadata": naming.metadata(job, uid, name, namespace),
        "spec": spec,
    }


def certificates(job: FederatedJob, uid: str, settings: OperatorSettings) -> list[dict[str, Any]]:
    """cert-manager mode: the aggregator's Certificate and, with mutual TLS, each in-cluster silo's."""
    hosts = server_hosts(job, settings)
    server = {"secretName": tls_secret_name(job), "dnsNames": hosts, "usages": ["server auth", "digital signature"]}
    out = [_certificate(job, uid, naming.aggregator_name(job), naming.job_namespace(job), server)]
    if job.spec.aggregator.tls.mutual:
        for silo in job.spec.silos:
            if silo.external:
                continue  # its own organisation issues it (the silo chart mounts it)
            client = {
                "secretName": silo_tls_secret_name(job, silo),
                "commonName": f"{job.metadata.name}/{silo.name}",
                "uris": [tls.silo_uri(job.metadata.name, silo.name)],
                "usages": ["client auth", "digital signature"],
            }
            out.append(
                _certificate(job, uid, silo_tls_secret_name(job, silo), naming.silo_namespace(job, silo), client)
            )
    return out


def aggregator_tls_mounts(
    job: FederatedJob, job_tls: JobTls
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any] | None]:
    """The aggregator's TLS env, volume and mount: certificate and key (and the client CA with mutual TLS)."""
    if job_tls.mode == "insecure":
        return [{"name": "FEDSILO_INSECURE_HTTP", "value": "true"}], None, None
    env = [
        {"name": "FEDSILO_TLS_CERT_FILE", "value": f"{TLS_DIR}/{CERT_KEY}"},
        {"name": "FEDSILO_TLS_KEY_FILE", "value": f"{TLS_DIR}/{KEY_KEY}"},
    ]
    items = [CERT_KEY, KEY_KEY]
    if job_tls.mutual:  # the same CA signs the silos' client certificates
        env.append({"name": "FEDSILO_TLS_CLIENT_CA_FILE", "value": f"{TLS_DIR}/{CA_KEY}"})
        items.append(CA_KEY)
    secret = {"secretName": tls_secret_name(job), "items": [{"key": k, "path": k} for k in items]}
    return env, {"name": "tls", "secret": secret}, {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}


def silo_tls_mounts(
    job: FederatedJob, silo: SiloSpec, job_tls: JobTls
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """A silo agent's CA bundle and client certificate: env, volumes and mounts."""
    if job_tls.mode == "insecure":
        return [], [], []
    token_secret = naming.silo_token_secret_name(job, silo)
    env = [{"name": "FEDSILO_CA_BUNDLE", "value": f"{TLS_DIR}/{CA_KEY}"}]
    items = [CA_KEY]
    volumes: list[dict[str, Any]] = []
    mounts = [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True}]
    client_dir = TLS_DIR
    if job_tls.mutual and job_tls.mode == "certManager":  # cert-manager wrote the client certificate
        client_dir = CLIENT_DIR
        client = {
            "secretName": silo_tls_secret_name(job, silo),
            "items": [{"key": k, "path": k} for k in (CERT_KEY, KEY_KEY)],
        }
        volumes.append({"name": "client", "secret": client})
        mounts.append({"name": "client", "mountPath": CLIENT_DIR, "readOnly": True})
    elif job_tls.mutual:
        items += [CERT_KEY, KEY_KEY]
    if job_tls.mutual:
        env += [
            {"name": "FEDSILO_CLIENT_CERT", "value": f"{client_dir}/{CERT_KEY}"},
            {"name": "FEDSILO_CLIENT_KEY", "value": f"{client_dir}/{KEY_KEY}"},
        ]
    volumes.insert(
        0, {"name": "tls", "secret": {"secretName": token_secret, "items": [{"key": k, "path": k} for k in items]}}
    )
    return env, volumes, mounts


def default_tls(job: FederatedJob) -> JobTls:
    """The job's TLS mode with no certificate known yet (the handlers pass the real one)."""
    return JobTls(job.spec.aggregator.tls.mode, job.spec.aggregator.tls.mutual)


async def ensure_ca(kube: KubeClient, settings: OperatorSettings) -> tls.Issued:
    """The operator's CA: read from its Secret, created there once when absent."""
    secret = await kube.get("v1", "Secret", settings.operator_namespace, settings.ca_secret)
    if secret is None:
        ca = tls.create_ca("fedsilo operator CA")
        try:
            await kube.create(ca_secret(settings, ca))
            return ca
        except KubeError as exc:
            if exc.status != 409:
                raise
            return await ensure_ca(kube, settings)  # another replica made it first: use that one
    data = secret.get("data") or {}
    return tls.Issued.from_pem(_unb64(data[CERT_KEY]), _unb64(data[KEY_KEY]))


async def job_ca(kube: KubeClient, job: FederatedJob) -> str | None:
    """The CA (PEM) the operator verifies the job's aggregator against; None for plain HTTP or not issued yet."""
    if job.spec.aggregator.tls.mode == "insecure":
        return None
    secret = await kube.get("v1", "Secret", naming.job_namespace(job), tls_secret_name(job))
    value = ((secret or {}).get("data") or {}).get(CA_KEY)
    return _unb64(value).decode() if value else None


async def read_job_tls(kube: KubeClient, job: FederatedJob, settings: OperatorSettings) -> JobTls:
    """The job's certificates: issued or renewed (operator mode), or as cert-manager wrote them so far."""
    spec = job.spec.aggregator.tls
    if spec.mode == "insecure":
        return JobTls()
    secret = await kube.get("v1", "Secret", naming.job_namespace(job), tls_secret_name(job))
    existing = {key: _unb64(value).decode() for key, value in ((secret or {}).get("data") or {}).items()}
    if spec.mode == "certManager":
        return JobTls(spec.mode, spec.mutual, existing)
    ca = await ensure_ca(kube, settings)
    return JobTls(spec.mode, spec.mutual, complete_tls(existing, job, settings, ca))


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _unb64(value: str) -> bytes:
    return base64.b64decode(value)
