"""The aggregator's OpenAPI document, as the API really behaves.

FastAPI's own document knows only 2xx and its 422 shape. This one adds what the routes'
dependencies and kind imply: the bearer token each operation needs (admin, silo, or
either), the `Problem` body of every refusal, and for each operation the error statuses it
can answer (401 with a token dependency, 404 under a job, 408/413 with a body, 409/503
for writes ...), plus the patterns that job and silo names are held to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from fedsilo.api import models as m
from fedsilo.spec import DnsLabel

Role = str  # "admin", "silo" or "metrics"
SCHEMES = {
    "admin": {"type": "http", "scheme": "bearer", "description": "The aggregator's admin token."},
    "silo": {
        "type": "http",
        "scheme": "bearer",
        "description": "A silo's token, for its own silo's routes. On job reads, name the silo in X-Fedsilo-Silo.",
    },
    "metrics": {"type": "http", "scheme": "bearer", "description": "The metrics reader's token (Prometheus)."},
}
_NAME_SCHEMA = TypeAdapter(DnsLabel).json_schema()  # what `guards.checked_names` holds names to
PROBLEM = {"$ref": "#/components/schemas/Problem"}
WHY = {
    400: "The body is not JSON.",
    401: "No token, or not one this operation accepts.",
    403: "The silo may not do this (not sampled for the round, wrong role, wrong client certificate).",
    404: "No such job (or round, adapter version).",
    408: "The request body did not arrive in time.",
    409: "The job's state does not allow this now (not joined, wrong round, duplicate).",
    413: "The request body exceeds its limit.",
    422: "A parameter, header or body field is invalid.",
    503: "Not now: retry after Retry-After seconds (another aggregator holds the job, or it is aggregating).",
}


def _statuses(route: APIRoute, roles: tuple[Role, ...], method: str) -> set[int]:
    """The error statuses an operation can answer, from its dependencies and its kind."""
    write = method != "GET"
    statuses = {422} if route.path.startswith(m.API_PREFIX) else set()  # names, numbers, bodies to validate
    if roles:
        statuses.add(401)
    if "silo" in roles:
        statuses.add(403)  # mutual TLS: the client certificate must name the silo; and the engine's refusals
    if "{job}" in route.path:
        statuses.add(404)
    if write:
        statuses |= {408, 413, 409, 503}  # a body; job state; the job's lease (fenced) or an aggregation
    if write and route.body_field is not None:
        statuses.add(400)
    if roles == ("silo",) and not write and "{round}" not in route.path:
        statuses.add(409)  # a silo's task: join first
    return statuses


def document(app: FastAPI, routes: Sequence[APIRoute], auth: Mapping[Any, tuple[Role, ...]]) -> dict[str, Any]:
    """The document, built once per app.

    `routes`: the `/v1` routes (the app's own are found here); `auth`: each token dependency and
    the roles it admits.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    components["securitySchemes"] = {f"{role}Token": scheme for role, scheme in SCHEMES.items()}
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Problem"] = m.Problem.model_json_schema()
    for route in [*routes, *(r for r in app.routes if isinstance(r, APIRoute))]:  # the /v1 routes, then the app's
        roles = next((auth[d.call] for d in route.dependant.dependencies if d.call is not None and d.call in auth), ())
        for method in route.methods or ():
            operation = doc["paths"].get(route.path, {}).get(method.lower())
            if operation is not None:
                _operation(operation, route, roles, method)
    ready: dict[str, Any] = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    not_ready = {
        "description": "Not ready (waiting for the job's lease).",
        "content": {"application/json": {"schema": ready}},
    }
    doc["paths"]["/readyz"]["get"]["responses"]["503"] = not_ready
    exposition = {"text/plain": {"schema": {"type": "string"}}}  # Prometheus' text format, not JSON
    doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = exposition
    app.openapi_schema = doc
    return doc


def _operation(operation: dict[str, Any], route: APIRoute, roles: tuple[Role, ...], method: str) -> None:
    operation["security"] = [{f"{role}Token": []} for role in roles]
    responses = operation.setdefault("responses", {})
    for status in sorted(_statuses(route, roles, method)):
        problem: dict[str, Any] = {"description": WHY[status], "content": {"application/json": {"schema": PROBLEM}}}
        if status == 503:
            problem["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
        responses[str(status)] = problem
    for parameter in operation.get("parameters", []):
        if parameter["name"] in ("job", "silo", "x-fedsilo-silo"):
            parameter["schema"] = {**_NAME_SCHEMA, "title": parameter["schema"].get("title", parameter["name"])}
    if route.status_code == 201:  # created; 200 when it exists exactly as asked (an idempotent retry)
        responses["200"] = {**responses["201"], "description": "It exists already, exactly as asked."}
    if "{version}" in route.path:  # the adapter: an ETag, and 304 for a matching If-None-Match
        etag = {"ETag": {"schema": {"type": "string"}, "description": "The adapter's sha256, quoted."}}
        responses["200"]["headers"] = etag
        responses["304"] = {"description": "Not modified (If-None-Match matched).", "headers": etag}
