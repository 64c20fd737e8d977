"""Run the aggregator app under uvicorn."""

import logging

import uvicorn

from fedsilo.aggregator.app import create_app
from fedsilo.aggregator.settings import AggregatorSettings


def serve(settings: AggregatorSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s aggregator %(levelname)s %(message)s")
    app = create_app(settings)
    # Long polls end at shutdown instead of holding SIGTERM for up to 30 s.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
