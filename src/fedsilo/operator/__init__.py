"""The fedsilo Kubernetes operator: FederatedJob -> aggregator, silo agents, policies.

Public surface: `run_operator()`, `build_registry()`, `OperatorSettings`, and the
CRD generator functions `build_crd()`, `render_crd()`, `write_crd()`.
"""

from __future__ import annotations

import logging

from fedsilo.operator.children import reconcile
from fedsilo.operator.crd import build_crd, render_crd, write_crd
from fedsilo.operator.handlers import build_registry
from fedsilo.operator.settings import OperatorSettings

__all__ = [
    "OperatorSettings",
    "build_crd",
    "build_registry",
    "reconcile",
    "render_crd",
    "run_operator",
    "write_crd",
]


def run_operator(settings: OperatorSettings | None = None) -> None:
    """Run the operator until interrupted (cluster-wide unless FEDSILO_WATCH_NAMESPACES is set)."""
    import kopf

    settings = settings or OperatorSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One line per HTTP request (every status poll) is noise at INFO; failures still show.
    for noisy in ("httpx", "httpcore", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    namespaces = settings.namespaces()
    kopf.run(
        registry=build_registry(settings),
        standalone=not settings.peering,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint="http://0.0.0.0:8081/healthz",
    )
