"""Pure builders of a job's NetworkPolicies.

Silo pods may reach only the aggregator (and cluster DNS); the aggregator accepts only
its silos, the operator's status polls, metrics scrapes and (with external silos) the
ingress controller.
"""

from __future__ import annotations

from typing import Any

from fedsilo.operator import naming
from fedsilo.operator.settings import OperatorSettings
from fedsilo.spec import FederatedJob, SiloSpec

NAMESPACE_LABEL = "kubernetes.io/metadata.name"


def _namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: name}}}


def _tcp(port: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def aggregator_policy(job: FederatedJob, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    """Ingress to the aggregator's API: silos, operator, ingress (external silos); to its metrics port: Prometheus."""
    peers: list[dict[str, Any]] = [
        {
            **_namespace(naming.silo_namespace(job, silo)),
            "podSelector": {"matchLabels": naming.silo_selector(job, silo)},
        }
        for silo in job.spec.silos
        if not silo.external
    ]
    peers.append(_namespace(settings.operator_namespace))
    if any(silo.external for silo in job.spec.silos):
        peers.append(_namespace(settings.ingress_namespace))
    name = naming.aggregator_name(job)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": naming.metadata(
            job, uid, name, naming.job_namespace(job), {naming.LABEL_COMPONENT: naming.AGGREGATOR}
        ),
        "spec": {
            "podSelector": {"matchLabels": naming.aggregator_selector(job)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": peers, "ports": [_tcp(settings.aggregator_port)]},
                # only Prometheus reaches the token-less metrics port (and not the API)
                {"from": [_namespace(settings.metrics_namespace)], "ports": [_tcp(settings.aggregator_metrics_port)]},
            ],
        },
    }


def silo_policy(job: FederatedJob, uid: str, silo: SiloSpec, settings: OperatorSettings) -> dict[str, Any]:
    """A silo pod talks only to its aggregator and DNS; only Prometheus may scrape it."""
    aggregator = {
        **_namespace(naming.job_namespace(job)),
        "podSelector": {"matchLabels": naming.aggregator_selector(job)},
    }
    dns = {**_namespace("kube-system"), "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
    dns_ports = [{"protocol": "UDP", "port": 53}, _tcp(53)]
    namespace = naming.silo_namespace(job, silo)
    name = naming.silo_name(job, silo)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": naming.metadata(
            job, uid, name, namespace, {naming.LABEL_SILO: silo.name, naming.LABEL_COMPONENT: naming.SILO_AGENT}
        ),
        "spec": {
            "podSelector": {"matchLabels": naming.silo_selector(job, silo)},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [
                {"to": [aggregator], "ports": [_tcp(settings.aggregator_port)]},
                {"to": [dns], "ports": dns_ports},
            ],
            "ingress": [
                {
                    "from": [_namespace(settings.metrics_namespace)],
                    "ports": [_tcp(settings.silo_metrics_port)],
                }
            ],
        },
    }


def network_policies(job: FederatedJob, uid: str, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The aggregator's policy and one per in-cluster silo."""
    policies = [aggregator_policy(job, uid, settings)]
    policies.extend(silo_policy(job, uid, silo, settings) for silo in job.spec.silos if not silo.external)
    return policies
