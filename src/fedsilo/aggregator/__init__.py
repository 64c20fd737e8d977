"""The aggregator: REST API, round engine, store and metrics. It never loads the base model."""
