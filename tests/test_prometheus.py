"""The Grafana dashboard against a real Prometheus scraping a real aggregator.

A real `fedsilo aggregator` process runs a 3-round job driven through its HTTP API by
scripted silos (small synthetic adapter tensors, no model, no training); a real Prometheus
(/usr/bin/prometheus, from scripts/install-tools.sh) scrapes it every second with
`honor_labels: true`, as the chart's ServiceMonitor does. Then every PromQL expression and
template-variable query in dashboards/fedsilo.json must return data: a broken query or a
renamed metric fails here. Skipped only when the prometheus binary is absent.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedsilo.adapters import to_bytes
from fedsilo.aggregator.metrics import Metrics
from fedsilo.api import models as m
from fedsilo.api.client import Client, ClientError
from fedsilo.spec import parse_job

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "fedsilo.json"
PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
JOB = "dash-test"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
METRICS_TOKEN = "metrics-reader-token-0123456789"
TRAINERS = ("hospital-a", "hospital-b")
EVALUATOR = "auditor"
ROUNDS = 3
ROUND_PACE_SECONDS = 1.2  # > the 1 s scrape interval, so every rate() sees several samples
# What Grafana would substitute for its built-in variables.
BUILTINS = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m"}


# ---------------------------------------------------------------- dashboard parsing (pure)


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target, rows' nested panels included."""
    found = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            found.append((panel.get("title", "?"), target["expr"]))
    return found


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """name -> query of every `query` template variable."""
    found = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            found[var["name"]] = query["query"] if isinstance(query, dict) else query
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace $name and ${name} the way Grafana does; refuse unknown variables."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def regex_escape(value: str) -> str:
    """Grafana's escaping of a multi-value variable inside a PromQL regex string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bfedsilo_[a-z0-9_]+", expr))


def registered_names() -> set[str]:
    """Every sample name the aggregator's registry can expose (with histogram suffixes)."""
    names = set()
    for family in Metrics().registry.collect():
        base = family.name
        if family.type == "counter":
            names |= {f"{base}_total"}
        elif family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        else:
            names.add(base)
    return names


def test_dashboard_structure_and_metric_names() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variable_queries(dashboard)["job"] == "label_values(fedsilo_round, job)"
    ids = []
    known = registered_names()
    queries = panel_queries(dashboard)
    assert len(queries) >= 15
    for panel in dashboard["panels"]:
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for title, expr in queries:
        unknown = metric_names(expr) - known
        assert not unknown, f"{title}: {sorted(unknown)} not exported by fedsilo.aggregator.metrics"
        assert 'job=~"$job"' in expr, f"{title}: not filtered by the job variable: {expr}"
    titles = {title for title, _ in queries}
    for needed in (
        "Global accuracy",
        "Loss per silo",
        "Round duration",
        "Aggregation duration",
        "Bytes per round",
        "Participation",
        "Rejected updates by reason",
    ):
        assert needed in titles


def test_chart_copy_of_the_dashboard_is_current() -> None:
    copy = ROOT / "charts" / "fedsilo" / "dashboards" / "fedsilo.json"
    assert copy.read_text() == DASHBOARD.read_text(), (
        "stale chart copy: run scripts/sync-chart-crd.sh"
    )


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            result = check()
        except (httpx.HTTPError, OSError):
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Stack:
    aggregator_url: str
    prometheus: httpx.Client  # base_url: the Prometheus HTTP API


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if PROMETHEUS is None:
        pytest.skip(
            "prometheus binary not found: run scripts/install-tools.sh (Debian package prometheus)"
        )
    tmp = tmp_path_factory.mktemp("prom")
    agg_port, prom_port = free_port(), free_port()
    env = {
        **os.environ,
        "FEDSILO_ADMIN_TOKEN": ADMIN_TOKEN,
        "FEDSILO_DATABASE_URL": f"sqlite:///{tmp / 'fedsilo.db'}",
        "FEDSILO_CHECKPOINT_DIR": str(tmp / "checkpoints"),
        "FEDSILO_HOST": "127.0.0.1",
        "FEDSILO_PORT": str(agg_port),
        "FEDSILO_TICK_SECONDS": "0.2",
        "FEDSILO_LOG_LEVEL": "warning",
        "FEDSILO_METRICS_TOKEN": METRICS_TOKEN,
        "FEDSILO_INSECURE_HTTP": "true",  # the scrape's metric names are under test here, not TLS
    }
    for name in ("FEDSILO_JOB_FILE", "FEDSILO_SILO_TOKENS_FILE"):
        env.pop(name, None)
    agg_log = (tmp / "aggregator.log").open("wb")
    aggregator = subprocess.Popen(
        [sys.executable, "-m", "fedsilo", "aggregator"],
        env=env,
        stdout=agg_log,
        stderr=subprocess.STDOUT,
    )
    # The same scrape settings as the chart's ServiceMonitor: honor_labels keeps `job`.
    reader = tmp / "metrics-token"
    reader.write_text(METRICS_TOKEN)
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: fedsilo-aggregator\n"
        "    honor_labels: true\n"
        "    metrics_path: /metrics\n"
        f"    authorization:\n      credentials_file: {reader}\n"  # /metrics needs the reader's token
        f"    static_configs:\n      - targets: ['127.0.0.1:{agg_port}']\n"
    )
    prom_log = (tmp / "prometheus.log").open("wb")
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    agg_url, prom_url = f"http://127.0.0.1:{agg_port}", f"http://127.0.0.1:{prom_port}"
    http = httpx.Client(timeout=5)
    try:
        wait_until(
            lambda: http.get(f"{agg_url}/readyz").status_code == 200,
            60,
            "aggregator /readyz",
            aggregator,
        )
        wait_until(
            lambda: http.get(f"{prom_url}/-/ready").status_code == 200,
            30,
            "prometheus /-/ready",
            prometheus,
        )
        with httpx.Client(base_url=prom_url, timeout=10) as prom:
            yield Stack(agg_url, prom)
    finally:
        http.close()
        stop(prometheus)
        stop(aggregator)
        agg_log.close()
        prom_log.close()
        for name in ("aggregator.log", "prometheus.log"):
            text = (tmp / name).read_text(errors="replace")
            if text.strip():
                print(f"--- {name} (tail)\n{text[-3000:]}")


# ---------------------------------------------------------------- scripted silos


def job_document() -> dict[str, Any]:
    silos = [{"name": name, "data": {"path": f"{name}.csv"}} for name in TRAINERS]
    silos.append({"name": EVALUATOR, "role": "evaluator", "data": {"path": "test.csv"}})
    return {
        "apiVersion": "fedsilo.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": JOB},
        "spec": {
            "baseModel": {"path": "synthetic/no-model"},
            "task": {"type": "sequence-classification", "labels": ["no", "yes"]},
            "training": {"rounds": ROUNDS},
            "aggregation": {"strategy": "fedavg", "minSilos": 2, "roundTimeoutSeconds": 60},
            "privacy": {"dp": {"clipNorm": 1.0, "noiseMultiplier": 1.0}},  # so the epsilon panel has data
            "silos": silos,
        },
    }


def initial_adapter() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    prefix = "base_model.model.encoder.layer.0.attention.self.query"
    return {
        f"{prefix}.lora_A.weight": torch.randn(4, 16) * 0.01,
        f"{prefix}.lora_B.weight": torch.zeros(16, 4),
    }


def run_federation(url: str) -> dict[str, int]:
    """Drive one 3-round job through the real HTTP API; return what the silos did."""
    tokens = {name: f"{name}-token-0123456789" for name in (*TRAINERS, EVALUATOR)}
    admin = Client(url, JOB, ADMIN_TOKEN, retries=2)
    created = admin.create_job(parse_job(job_document()), tokens)
    assert created.name == JOB
    clients = {name: Client(url, JOB, token, name, retries=2) for name, token in tokens.items()}
    for name, client in clients.items():
        client.join(
            m.JoinRequest(n_train_examples=0 if name == EVALUATOR else 100, n_eval_examples=20)
        )
    counts = {"init": 0, "train": 0, "evaluate": 0, "rejected": 0}
    done: set[str] = set()
    paced: set[int] = set()
    deadline = time.monotonic() + 45
    while len(done) < len(clients):
        assert time.monotonic() < deadline, f"federation did not finish: {counts}, done={done}"
        for name, client in clients.items():
            if name in done:
                continue
            task = client.task()
            if task.action == "init":
                client.put_initial(to_bytes(initial_adapter()))
                counts["init"] += 1
            elif task.action == "train":
                if task.round not in paced:  # "training" time, once per round
                    paced.add(task.round)
                    time.sleep(ROUND_PACE_SECONDS)
                base = client.adapter(task.version)
                assert base
                delta = {
                    k: torch.full_like(v, 0.001 * task.round) for k, v in initial_adapter().items()
                }
                if task.round == 1 and name == TRAINERS[0]:
                    wrong = {k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in delta.items()}
                    with pytest.raises(ClientError) as refused:
                        client.put_update(task.round, to_bytes(wrong), 50, 0.1)
                    assert refused.value.reason == "wrong_shape"
                    counts["rejected"] += 1
                client.put_update(
                    task.round, to_bytes(delta), 50 + 10 * TRAINERS.index(name), ROUND_PACE_SECONDS
                )
                client.post_metrics(
                    m.MetricsReport(
                        version=task.version,
                        split="validation",
                        loss=1.0 / (1 + task.version),
                        accuracy=0.5 + 0.1 * task.version,
                        n_examples=10,
                    )
                )
                counts["train"] += 1
            elif task.action == "evaluate":
                client.post_metrics(
                    m.MetricsReport(
                        version=task.version,
                        split="test" if name == EVALUATOR else "validation",  # test: evaluators only
                        loss=0.9 / (1 + task.version),
                        accuracy=0.55 + 0.1 * task.version,
                        n_examples=20,
                    )
                )
                counts["evaluate"] += 1
            elif task.action == "done":
                done.add(name)
        time.sleep(0.05)
    status = admin.status()
    assert status.phase == "Succeeded" and status.round == ROUNDS, status
    for client in (admin, *clients.values()):
        client.close()
    return counts


# ---------------------------------------------------------------- PromQL through the HTTP API


def instant(prom: httpx.Client, expr: str) -> list[dict[str, Any]]:
    response = prom.get("/api/v1/query", params={"query": expr})
    body = response.json()
    if response.status_code != 200 or body.get("status") != "success":
        raise AssertionError(
            f"Prometheus refused {expr!r}: {body.get('errorType')}: {body.get('error')}"
        )
    data = body["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])


def label_values(prom: httpx.Client, query: str) -> list[str]:
    """Evaluate Grafana's label_values(selector, label) like its Prometheus data source."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert match, f"unsupported variable query {query!r}"
    selector, label = match.groups()
    response = prom.get(f"/api/v1/label/{label}/values", params={"match[]": selector})
    body = response.json()
    assert body.get("status") == "success", body
    return list(body["data"])


def empty_queries(
    prom: httpx.Client, queries: list[tuple[str, str]], values: dict[str, str]
) -> list[str]:
    """Panel queries (after substitution) that return no series or only NaN values."""
    problems = []
    for title, expr in queries:
        concrete = substitute(expr, values)
        result = instant(prom, concrete)
        numbers = [float(series["value"][1]) for series in result]
        if not numbers:
            problems.append(f"{title}: no data for {concrete}")
        elif not any(math.isfinite(x) for x in numbers):
            problems.append(f"{title}: only NaN/Inf for {concrete}")
    return problems


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    started = time.monotonic()
    wait_until(
        lambda: instant(stack.prometheus, 'up{job="fedsilo-aggregator"} == 1'),
        20,
        "first scrape",
    )
    counts = run_federation(stack.aggregator_url)
    assert (
        counts["init"] == 1
        and counts["train"] == ROUNDS * len(TRAINERS)
        and counts["rejected"] == 1
    )
    assert counts["evaluate"] >= ROUNDS
    # Wait until Prometheus has scraped the finished job, then one more scrape.
    wait_until(
        lambda: instant(
            stack.prometheus, f'fedsilo_round_duration_seconds_count{{job="{JOB}"}} == {ROUNDS}'
        ),
        15,
        "final round in Prometheus",
    )
    time.sleep(1.5)

    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana's $__rate_interval is at least 4 scrape intervals; here it must also span the
    # whole run (however slow the machine), so that every rate() sees the first round.
    window = max(30, math.ceil(time.monotonic() - started) + 10)
    values = {**BUILTINS, "__rate_interval": f"{window}s"}
    for name, query in variable_queries(dashboard).items():  # in dashboard order: job before silo
        options = label_values(stack.prometheus, substitute(query, values))
        assert options, f"variable ${name}: {query} returned no values"
        values[name] = "|".join(regex_escape(option) for option in options)
    assert values["job"] == JOB
    assert set(values["silo"].split("|")) == {*TRAINERS, EVALUATOR}

    queries = panel_queries(dashboard)
    problems = empty_queries(stack.prometheus, queries, values)
    assert not problems, "dashboard queries without data:\n" + "\n".join(problems)
    # The check is not vacuous: a renamed metric is reported.
    renamed = [("renamed", 'fedsilo_round_renamed{job=~"$job"}')]
    assert empty_queries(stack.prometheus, renamed, values) == [
        f'renamed: no data for fedsilo_round_renamed{{job=~"{values["job"]}"}}'
    ]
    # Spot-check values against what the silos did.
    rejected = instant(stack.prometheus, f'fedsilo_updates_rejected_total{{job="{JOB}"}}')
    assert [(s["metric"]["reason"], s["value"][1]) for s in rejected] == [("wrong_shape", "1")]
    accepted = instant(stack.prometheus, f'fedsilo_updates_accepted_total{{job="{JOB}"}}')
    assert accepted[0]["value"][1] == str(ROUNDS * len(TRAINERS))
    print(f"\n{len(queries)} dashboard queries checked in {time.monotonic() - started:.1f}s")
