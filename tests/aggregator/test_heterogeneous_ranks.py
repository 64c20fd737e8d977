"""Heterogeneous LoRA ranks through a real aggregator: fedavg averages each component over its trainers."""

from __future__ import annotations

import torch
from tests.aggregator.conftest import AggregatorProcess
from tests.aggregator.test_api import TOKENS, _v0, _wait_version
from tests.conftest import job_document

from fedsilo.adapters import from_bytes, to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client
from fedsilo.spec import parse_job


def test_fedavg_with_a_rank_2_silo_keeps_the_higher_components(aggregator: AggregatorProcess) -> None:
    doc = job_document(
        peft={"method": "lora", "r": 4, "targetModules": ["m"]},
        silos=[
            {"name": "alpha", "data": {"path": "alpha.csv"}},
            {"name": "beta", "rank": 2, "data": {"path": "beta.csv"}},
        ],
    )
    admin = Client(aggregator.url, "demo", aggregator.admin, retries=0)
    admin.create_job(parse_job(doc), TOKENS)
    a, b = (Client(aggregator.url, "demo", TOKENS[n], n, retries=0) for n in ("alpha", "beta"))
    for silo in (a, b):
        silo.join(m.JoinRequest(n_train_examples=100, n_eval_examples=50))
    v0 = _v0()  # A 4 x 6, B 5 x 4, a head
    a.put_initial(to_bytes(v0))
    full = {k: torch.full_like(v, 1.0) for k, v in v0.items()}
    low = {k: torch.full_like(v, 5.0) for k, v in v0.items()}
    low["m.lora_A.weight"][2:] = 0  # beta trains components 0 and 1 only: its padding is zero
    low["m.lora_B.weight"][:, 2:] = 0
    a.put_update(1, to_bytes(full), n_examples=30, train_seconds=1.0)
    b.put_update(1, to_bytes(low), n_examples=10, train_seconds=1.0)
    _wait_version(admin, 1)

    v1 = from_bytes(a.adapter(1))
    both = (30 * 1.0 + 10 * 5.0) / 40
    torch.testing.assert_close(v1["m.lora_A.weight"][:2], v0["m.lora_A.weight"][:2] + both)
    torch.testing.assert_close(v1["m.lora_A.weight"][2:], v0["m.lora_A.weight"][2:] + 1.0)  # alpha's alone
    torch.testing.assert_close(v1["m.lora_B.weight"][:, :2], v0["m.lora_B.weight"][:, :2] + both)
    torch.testing.assert_close(v1["m.lora_B.weight"][:, 2:], v0["m.lora_B.weight"][:, 2:] + 1.0)
    torch.testing.assert_close(v1["classifier.weight"], v0["classifier.weight"] + both)  # not a LoRA factor
