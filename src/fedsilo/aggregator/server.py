"""Run the aggregator app under uvicorn, every log line in one logfmt format."""

import uvicorn

from fedsilo.aggregator import logs
from fedsilo.aggregator.app import create_app
from fedsilo.aggregator.settings import AggregatorSettings


def serve(settings: AggregatorSettings) -> None:
    logs.setup(settings.log_level)
    app = create_app(settings)
    # Long polls end at shutdown instead of holding SIGTERM for up to 30 s.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's records go through the handler `logs.setup` installed
        access_log=False,  # one line per event instead (app.py): a poll is not news
        timeout_graceful_shutdown=2,
    )
