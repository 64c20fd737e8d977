"""Certificates in the cluster (pure): what the operator issues, what it mounts, what cert-manager is asked for.

The issued certificates go through real TLS handshakes in memory (`ssl.MemoryBIO`): the
aggregator's for its Service name, a silo's client certificate against the job's CA.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from tests.operator.test_handlers_kmock import NS as kmock_ns
from tests.operator.test_handlers_kmock import NS_B as kmock_ns_b
from tests.operator.test_handlers_kmock import job_manifest, kmock_cluster
from tests.operator.test_manifests import K8S_VERSION, UID, container_env, find, make_job

from fedsilo import tls
from fedsilo.operator.certificates import JobTls, complete_tls, job_ca, server_hosts
from fedsilo.operator.children import reconcile
from fedsilo.operator.manifests import job_children
from fedsilo.operator.settings import OperatorSettings
from fedsilo.operator.tokens import complete_tokens
from fedsilo.spec import SpecError, parse_job

SETTINGS = OperatorSettings()
FQDN = "demo-aggregator.fl.svc.cluster.local"


def _secret_data(manifest: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in manifest["data"].items()}


def _files(tmp_path: Path, **pems: str) -> dict[str, Path]:
    paths = {}
    for name, pem in pems.items():
        paths[name] = tmp_path / name
        paths[name].write_text(pem)
    return paths


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> ssl.SSLObject:
    """A full TLS handshake between two contexts over memory buffers; returns the server's end."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    server_end = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end, outgoing, peer_in in (("client", client_end, c_out, s_in), ("server", server_end, s_out, c_in)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(outgoing.read())
        if all(done.values()):
            client_end.write(b"x")  # TLS 1.3: the server checks the client certificate on the first record
            s_in.write(c_out.read())
            server_end.read(1)
            return server_end
    raise AssertionError("handshake did not finish")


def _operator_tls(**tls_spec: Any) -> tuple[Any, JobTls, tls.Issued]:
    job = make_job(tls=tls_spec) if tls_spec else make_job()
    ca = tls.create_ca("operator CA")
    return job, JobTls("operator", job.spec.aggregator.tls.mutual, complete_tls({}, job, SETTINGS, ca)), ca


def test_the_server_certificate_names_the_service_and_the_public_host() -> None:
    job = make_job(externalUrl="https://fl.example.org/fedsilo")
    assert server_hosts(job, SETTINGS) == [
        "demo-aggregator",
        "demo-aggregator.fl",
        "demo-aggregator.fl.svc",
        FQDN,
        "fl.example.org",
    ]


def test_issued_once_kept_after_and_renewed_near_expiry_or_for_a_new_ca() -> None:
    job, first, ca = _operator_tls(mutual=True)
    assert set(first.data) == {
        "ca.crt",
        "tls.crt",
        "tls.key",
        *(f"silo-{s}.{e}" for s in "abc" for e in ("crt", "key")),
    }
    assert complete_tls(first.data, job, SETTINGS, ca) == first.data  # a resync changes nothing
    later = datetime.now(UTC) + timedelta(days=340)  # within 30 days of expiry
    renewed = complete_tls(first.data, job, SETTINGS, ca, now=later)
    assert renewed["tls.crt"] != first.data["tls.crt"] and renewed["silo-a.crt"] != first.data["silo-a.crt"]
    other = complete_tls(first.data, job, SETTINGS, tls.create_ca("a new CA"))
    assert other["tls.crt"] != first.data["tls.crt"] and other["ca.crt"] != first.data["ca.crt"]


def test_a_removed_silo_loses_its_certificate_and_an_added_one_gets_one() -> None:
    job, first, ca = _operator_tls(mutual=True)
    document = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["spec"]["silos"] = [*document["spec"]["silos"][1:], {"name": "d", "data": {"path": "d.csv"}}]
    changed = complete_tls(first.data, parse_job(document), SETTINGS, ca)
    assert "silo-a.crt" not in changed and changed["silo-b.crt"] == first.data["silo-b.crt"]
    assert tls.silo_identity_pem(changed["silo-d.crt"]) == ("demo", "d")


def test_operator_issued_certificates_pass_a_real_mutual_tls_handshake(tmp_path: Path) -> None:
    _, job_tls, _ = _operator_tls(mutual=True)
    f = _files(tmp_path, **{k.replace(".", "_"): v for k, v in job_tls.data.items()})
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(f["tls_crt"], f["tls_key"])
    server.load_verify_locations(f["ca_crt"])
    server.verify_mode = ssl.CERT_OPTIONAL  # as the aggregator: a sent certificate must verify
    client = tls.client_context(f["ca_crt"], (f["silo-b_crt"], f["silo-b_key"]))
    end = _handshake(server, client, FQDN)
    peer = end.getpeercert(binary_form=True)
    assert peer is not None
    assert tls.silo_identity_pem(ssl.DER_cert_to_PEM_cert(peer)) == ("demo", "b")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(server, tls.client_context(f["ca_crt"]), "aggregator.elsewhere.svc")


def test_operator_mode_mounts_the_certificates_and_serves_https() -> None:
    job, job_tls, _ = _operator_tls(mutual=True)
    items = job_children(job, UID, complete_tokens(None, job.spec), SETTINGS, "https://fl.example.org", job_tls)
    assert _secret_data(find(items, "Secret", "demo-tls")) == job_tls.data
    deployment = find(items, "Deployment", "demo-aggregator")
    env = container_env(deployment)
    assert env["FEDSILO_TLS_CERT_FILE"] == "/etc/fedsilo/tls/tls.crt"
    assert env["FEDSILO_TLS_CLIENT_CA_FILE"] == "/etc/fedsilo/tls/ca.crt"
    assert "FEDSILO_INSECURE_HTTP" not in env
    pod = deployment["spec"]["template"]
    assert pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert pod["metadata"]["annotations"]["fedsilo.io/tls-certificate"] == job_tls.server_digest()
    for silo in "abc":  # external silo c too: its organisation takes these to the silo chart
        data = _secret_data(find(items, "Secret", f"demo-silo-{silo}-token"))
        assert data["ca.crt"] == job_tls.ca and tls.silo_identity_pem(data["tls.crt"]) == ("demo", silo)
    silo_env = container_env(find(items, "Job", "demo-silo-a"))
    assert silo_env["FEDSILO_AGGREGATOR_URL"] == f"https://{FQDN}:8080"
    assert silo_env["FEDSILO_CLIENT_KEY"] == "/etc/fedsilo/tls/tls.key"
    for manifest in items:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_cert_manager_mode_asks_for_certificates_and_mounts_what_it_writes() -> None:
    job = make_job(tls={"mode": "certManager", "mutual": True, "issuerRef": {"name": "fedsilo"}})
    items = job_children(job, UID, complete_tokens(None, job.spec), SETTINGS, None, JobTls("certManager", True))
    server = find(items, "Certificate", "demo-aggregator")
    assert server["spec"]["secretName"] == "demo-tls" and FQDN in server["spec"]["dnsNames"]
    assert server["spec"]["issuerRef"] == {"name": "fedsilo", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    silo_b = find(items, "Certificate", "demo-silo-b-tls")
    assert silo_b["metadata"]["namespace"] == "hospital-b" and silo_b["spec"]["uris"] == ["fedsilo://demo/b"]
    assert not [m for m in items if m["kind"] == "Certificate" and "silo-c" in m["metadata"]["name"]]  # external
    pod = find(items, "Job", "demo-silo-b")["spec"]["template"]["spec"]
    client = next(v for v in pod["volumes"] if v["name"] == "client")
    assert client["secret"]["secretName"] == "demo-silo-b-tls"
    assert container_env(find(items, "Job", "demo-silo-b"))["FEDSILO_CLIENT_CERT"] == "/etc/fedsilo/client/tls.crt"


def test_insecure_mode_is_plain_http_by_name() -> None:
    job = make_job(tls={"mode": "insecure"})
    items = job_children(job, UID, complete_tokens(None, job.spec), SETTINGS)
    assert container_env(find(items, "Deployment", "demo-aggregator"))["FEDSILO_INSECURE_HTTP"] == "true"
    silo_env = container_env(find(items, "Job", "demo-silo-a"))
    assert silo_env["FEDSILO_AGGREGATOR_URL"].startswith("http://") and "FEDSILO_CA_BUNDLE" not in silo_env
    assert not [m for m in items if m["metadata"]["name"] == "demo-tls"]


@pytest.mark.parametrize(
    ("tls_spec", "error"),
    [({"mode": "certManager"}, "issuerRef is required"), ({"mode": "insecure", "mutual": True}, "mutual needs TLS")],
)
def test_contradictory_tls_settings_are_refused(tls_spec: dict[str, Any], error: str) -> None:
    with pytest.raises(SpecError, match=error):
        make_job(tls=tls_spec)


def test_the_operator_keeps_one_ca_and_issues_a_jobs_certificates_once() -> None:
    """Against the kmock emulator: the CA Secret is created once, `<job>-tls` survives resyncs unchanged."""
    asyncio.run(_issue_against_kmock())


async def _issue_against_kmock() -> None:
    settings = OperatorSettings()
    body = job_manifest()
    body["metadata"]["uid"] = UID
    body["spec"]["aggregator"] = {"tls": {"mutual": True}}
    async with kmock_cluster() as cluster:
        kube = cluster.kube
        job, _ = await reconcile(kube, body, settings)
        ca = await kube.get("v1", "Secret", settings.operator_namespace, settings.ca_secret)
        issued = await kube.get("v1", "Secret", kmock_ns, "demo-tls")
        assert ca is not None and issued is not None
        await reconcile(kube, body, settings)  # a resync: nothing is issued again
        assert (await kube.get("v1", "Secret", settings.operator_namespace, settings.ca_secret) or {})["data"] == ca[
            "data"
        ]
        assert (await kube.get("v1", "Secret", kmock_ns, "demo-tls") or {})["data"] == issued["data"]
        ca_pem = _secret_data(ca)["tls.crt"]
        assert await job_ca(kube, job) == ca_pem == _secret_data(issued)["ca.crt"]
        silo_b = _secret_data(await kube.get("v1", "Secret", kmock_ns_b, "demo-silo-b-token") or {})
        assert silo_b["ca.crt"] == ca_pem and tls.silo_identity_pem(silo_b["tls.crt"]) == ("demo", "b")
