"""A bounded, seeded schemathesis run over the aggregator's own OpenAPI document.

Every operation is fuzzed, with valid and with invalid input, as the admin and as a joined
silo of a running job (so the cases reach the round engine, not only the token check): no
answer may be a 5xx, each one must be documented (status, content type, headers) and match
its schema, and what the document calls invalid must be refused.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi
from tests.aggregator.conftest import postgres_database
from tests.conftest import job_document

from fedsilo.adapters import to_bytes
from fedsilo.aggregator.app import create_app
from fedsilo.aggregator.settings import AggregatorSettings

ADMIN = "admin-token-0123456789"
TOKENS = {"alpha": "alpha-token-0123456789", "beta": "beta-token-0123456789"}
CHECKS = [
    getattr(schemathesis.checks, name)
    for name in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",  # what the document calls invalid is refused
    )
]
EXAMPLES = 10  # per operation, mode, caller and store: some 1,200 cases, under a minute here
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same cases on every run: CI stays deterministic
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


def _adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "m.lora_A.weight": torch.randn(4, 6, generator=g),
        "m.lora_B.weight": torch.zeros(5, 4),
        "classifier.weight": torch.randn(2, 6, generator=g),
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    """An app with two jobs in round 1, both silos joined: `demo` (plain) and `vault` (secure, key stage)."""
    root: Path = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{root / 'fedsilo.db'}" if request.param == "sqlite" else postgres_database()
    app = create_app(AggregatorSettings(admin_token=ADMIN, database_url=url, checkpoint_dir=root / "checkpoints"))
    client = TestClient(app)
    for name, secure in (("demo", False), ("vault", True)):
        document = job_document(aggregation={"strategy": "fedavg", "minSilos": 2, "secure": secure})
        document["metadata"]["name"] = name
        body = {"job": document, "silo_tokens": TOKENS}
        created = client.post("/v1/jobs", json=body, headers=_bearer(ADMIN))
        assert created.status_code == 201, created.text
        for silo, token in TOKENS.items():
            sizes = {"n_train_examples": 10, "n_eval_examples": 2}
            joined = client.post(f"/v1/jobs/{name}/silos/{silo}/join", json=sizes, headers=_bearer(token))
            assert joined.status_code == 200, joined.text
        initial = client.put(
            f"/v1/jobs/{name}/silos/alpha/adapters/0", content=to_bytes(_adapter()), headers=_bearer(TOKENS["alpha"])
        )
        assert initial.status_code == 200, initial.text
    yield app
    asgi.shutdown_lifespans()  # the app's ticker, started by schemathesis' in-process client


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _fuzz(app: FastAPI, caller: str) -> Counter[tuple[str, int]]:
    """Every operation, both modes; all failures reported together (one does not hide the next).

    Valid cases aim at a running job (round 1, the caller's silo), or they would only meet 404s.
    The admin's invalid cases are left as generated (the invalid part may be a name); a silo's
    keep the job and silo names, so their invalid numbers and bodies reach the engine's checks.
    """
    # unknown query parameters and headers are ignored, as HTTP APIs do: not "invalid" input here
    config = SchemathesisConfig.from_dict({"generation": {"allow-extra-parameters": False}})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, headers=_bearer(ADMIN))
    # the token is fixed, never left out or mangled: test_hostile.py covers missing and malformed ones
    headers = _bearer(ADMIN if caller == "admin" else TOKENS[caller])
    if caller != "admin":
        headers["x-fedsilo-silo"] = caller  # a silo names itself on job reads
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        job = "vault" if "/secagg/" in operation.path else "demo"
        aim = {"job": job, "silo": caller, "round": 1}
        valid = {k: v for k, v in aim.items() if "{" + k + "}" in operation.path}
        names = {k: v for k, v in valid.items() if k != "round"} if caller != "admin" else None
        # long polls answer at once: a valid `wait` would hold each case up to 30 s
        short = {"wait": 0.01} if any(p.name == "wait" for p in operation.query) else None
        for mode, path, query in ((GenerationMode.POSITIVE, valid, short), (GenerationMode.NEGATIVE, names, None)):
            strategy = operation.as_strategy(mode, path_parameters=path or None, headers=headers, query=query)
            try:
                _run(strategy, seen)()
            except Unsatisfiable:
                pass  # nothing left that could be invalid (no parameters, no body)
            except Exception as exc:  # a failed check: collect it, go on with the next operation
                inner = "".join(f"\n  {e!r}" for e in getattr(exc, "exceptions", ()))  # a flaky one's cause
                failures.append(f"{operation.label} ({mode.value}): {exc}{inner}")
    print(f"fuzzed as {caller} in {time.monotonic() - started:.1f} s: {sorted(seen.items())}")
    assert not failures, "\n\n".join(failures)
    return seen


def _run(strategy: Any, seen: Counter[tuple[str, int]]) -> Callable[[], None]:
    @FUZZ
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS)
        seen[(case.operation.label, response.status_code)] += 1

    return check  # type: ignore[no-any-return]


@pytest.mark.timeout(300)
def test_as_the_admin(app: FastAPI) -> None:
    _fuzz(app, "admin")


@pytest.mark.timeout(300)
def test_as_a_silo_of_a_running_job(app: FastAPI) -> None:
    seen = _fuzz(app, "alpha")
    reached = {operation for (operation, status), _ in seen.items() if status < 300}
    assert {  # valid cases got past the token and name checks, into the engine
        "GET /v1/jobs/{job}/silos/{silo}/task",
        "GET /v1/jobs/{job}/rounds",
        "GET /v1/jobs/{job}/rounds/{round}/secagg/{silo}",
    } <= reached, reached


def test_the_document_declares_tokens_refusals_and_names(app: FastAPI) -> None:
    doc = TestClient(app).get("/openapi.json", headers=_bearer(ADMIN)).json()
    assert set(doc["components"]["securitySchemes"]) == {"adminToken", "siloToken", "metricsToken"}
    operations = {f"{verb.upper()} {path}": op for path, ops in doc["paths"].items() for verb, op in ops.items()}
    assert operations["POST /v1/jobs"]["security"] == [{"adminToken": []}]
    assert operations["GET /v1/jobs/{job}"]["security"] == [{"adminToken": []}, {"siloToken": []}]
    assert operations["PUT /v1/jobs/{job}/rounds/{round}/updates/{silo}"]["security"] == [{"siloToken": []}]
    assert operations["GET /healthz"]["security"] == []
    assert operations["GET /metrics"]["security"] == [{"adminToken": []}, {"metricsToken": []}]
    upload = operations["PUT /v1/jobs/{job}/rounds/{round}/updates/{silo}"]["responses"]
    assert {"401", "403", "404", "408", "409", "413", "422", "503"} <= set(upload)
    assert upload["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "408" not in operations["GET /v1/jobs/{job}/rounds"]["responses"]  # no body, nothing to wait for
    for name, op in operations.items():
        for parameter in op.get("parameters", []):
            if parameter["name"] in ("job", "silo"):
                assert parameter["schema"]["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name
            if parameter["name"] in ("round", "version"):
                assert parameter["schema"]["maximum"] == 2**31 - 1, name
