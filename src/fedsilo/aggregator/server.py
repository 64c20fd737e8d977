"""Run the aggregator app under uvicorn, every log line in one logfmt format."""

import logging
import ssl

import torch
import uvicorn
from prometheus_client import start_http_server

from fedsilo.aggregator import heap, logs, peer
from fedsilo.aggregator.app import create_app
from fedsilo.aggregator.settings import AggregatorSettings

log = logging.getLogger("fedsilo.aggregator")


def serve(settings: AggregatorSettings) -> None:
    problem = settings.tls_problem()
    if problem:
        raise SystemExit(f"fedsilo aggregator: {problem}")
    logs.setup(settings.log_level)
    torch.set_num_threads(settings.torch_threads)
    heap.return_large_buffers()
    if settings.insecure_http:
        log.warning("INSECURE: serving plain HTTP (FEDSILO_INSECURE_HTTP): tokens and adapters travel unencrypted")
    app = create_app(settings)
    if settings.metrics_port:  # Prometheus' own door: no token, reachable only where the network admits it
        start_http_server(settings.metrics_port, addr=settings.host, registry=app.state.metrics.registry)
    mutual = settings.tls_client_ca_file is not None
    # Long polls end at shutdown instead of holding SIGTERM for up to 30 s.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's records go through the handler `logs.setup` installed
        access_log=False,  # one line per event instead (app.py): a poll is not news
        timeout_graceful_shutdown=2,
        http=peer.protocol() if mutual else "auto",
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        ssl_ca_certs=settings.tls_client_ca_file,
        # Optional, not required, at the handshake: probes, Prometheus and the admin (bearer token) have no
        # client certificate; one that is sent must verify, and silo routes require it (peer.py).
        ssl_cert_reqs=ssl.CERT_OPTIONAL if mutual else ssl.CERT_NONE,
    )
