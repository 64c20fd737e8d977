"""Causal LM instruction tuning: rendering, answer-only labels, big-model switches, a tiny federation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from tests.conftest import ROOT
from tests.tiny_causal import PAIRS, build_model_folder, build_tokenizer, write_jsonl

from fedsilo.silo_agent.causal_lm import (
    IGNORE,
    CausalLMTrainer,
    causal_batches,
    encode_causal_lm,
    encode_example,
    render,
)
from fedsilo.silo_agent.data import DataError
from fedsilo.silo_agent.hardware import HardwareError, check_device, memory_estimate
from fedsilo.silo_agent.model import load_base, peft_config, wrap
from fedsilo.spec import DataSpec, SpecError, TrainingSpec, load_job, parse_spec

CHAT = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]


def answer_text(tokenizer: Any, example: dict[str, list[int]]) -> str:
    return str(tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"], strict=True)
                                 if lab != IGNORE]))


def test_chat_template_renders_turns_and_generation_prompt() -> None:
    tok = build_tokenizer()
    assert render(tok, CHAT) == ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                                 "<|im_start|>assistant\nFour.<|im_end|>\n")
    assert render(tok, CHAT[:1], generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_plain_template_when_the_tokenizer_has_none() -> None:
    tok = build_tokenizer(chat_template=None)
    assert render(tok, CHAT[:1], generation_prompt=True) == "### Instruction:\nWhat is two plus two?\n\n### Response:\n"
    example = encode_example(tok, CHAT, 64)
    assert answer_text(tok, example) == "Four.<|im_end|>"


def test_loss_falls_on_answer_tokens_only() -> None:
    tok = build_tokenizer()
    example = encode_example(tok, CHAT, 64)
    assert answer_text(tok, example) == "Four.<|im_end|>"
    prompt_len = len(tok(render(tok, CHAT[:1], generation_prompt=True), add_special_tokens=False)["input_ids"])
    assert set(example["labels"][:prompt_len]) == {IGNORE}
    dialogue = [*CHAT, {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]
    assert answer_text(tok, encode_example(tok, dialogue, 128)) == "Four.<|im_end|>Six.<|im_end|>"


def test_batches_pad_right_with_ignored_labels() -> None:
    tok = build_tokenizer()
    frame = pd.DataFrame([{"instruction": "Hi", "output": "Hello there, how are you?"},
                          {"instruction": "What is the capital of France?", "input": "One word.", "output": "Paris."}])
    encoded = encode_causal_lm(frame, DataSpec(path="x.jsonl"), tok, 64)
    assert "One word." in tok.decode(encoded.features[1]["input_ids"])  # input appended to the instruction
    (batch,) = causal_batches(encoded, 2, tok, [0, 1])
    lengths = [len(f["input_ids"]) for f in encoded.features]
    short = lengths.index(min(lengths))
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"][short, min(lengths):].sum() == 0
    assert (batch["labels"][short, min(lengths):] == IGNORE).all()


def test_messages_column_and_data_errors() -> None:
    tok = build_tokenizer()
    frame = pd.DataFrame({"messages": [CHAT, CHAT]})
    assert len(encode_causal_lm(frame, DataSpec(path="x.jsonl"), tok, 64)) == 2
    with pytest.raises(DataError, match="missing column"):
        encode_causal_lm(pd.DataFrame({"question": ["q"]}), DataSpec(path="x.jsonl"), tok, 64)
    long = pd.DataFrame([{"instruction": "word " * 200, "output": "Four."}])
    with pytest.raises(DataError, match=r"training.maxLength=16"):
        encode_causal_lm(long, DataSpec(path="x.jsonl"), tok, 16)


def test_big_model_switches_fail_clearly_without_cuda() -> None:
    with pytest.raises(HardwareError, match=r"training.loadIn4bit"):
        check_device(TrainingSpec(load_in_4bit=True, precision="bf16"), cuda=False)
    with pytest.raises(HardwareError, match=r"training.precision fp16"):
        check_device(TrainingSpec(precision="fp16"), cuda=False)
    check_device(TrainingSpec(precision="bf16", gradient_checkpointing=True), cuda=False)  # allowed on CPU
    with pytest.raises(SpecError, match=r"spec.training.precision"):
        parse_spec({"baseModel": {"path": "m"}, "task": {"type": "causal-lm"}, "training": {"precision": "fp8"},
                    "silos": [{"name": "a", "data": {"path": "a.jsonl"}}]})
    with pytest.raises(SpecError, match=r"spec.training.loadIn4bit"):
        parse_spec({"baseModel": {"path": "m"}, "task": {"type": "causal-lm"}, "training": {"loadIn4bit": "maybe"},
                    "silos": [{"name": "a", "data": {"path": "a.jsonl"}}]})


def test_memory_estimate_adds_up_and_checkpointing_saves_activations() -> None:
    shape = {"batch": 4, "tokens": 512, "hidden": 4096, "layers": 32, "vocab": 32000, "precision": "bf16"}
    full = memory_estimate(7 * 10**9 // 2, 4 * 10**6, checkpointing=False, **shape)  # type: ignore[arg-type]
    ckpt = memory_estimate(7 * 10**9 // 2, 4 * 10**6, checkpointing=True, **shape)  # type: ignore[arg-type]
    assert ckpt.activations < full.activations / 5
    assert full.total == full.weights + full.adapter + full.optimizer + full.activations
    assert full.optimizer == 3 * full.adapter


def test_seven_b_manifest_validates() -> None:
    job = load_job(ROOT / "examples" / "llama2-7b-hospitals.yaml")
    assert job.spec.training.load_in_4bit and job.spec.training.precision == "bf16"
    assert all("nvidia.com/gpu" in s.resources.limits for s in job.spec.silos if not s.external)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("tiny-llama"))


def test_evaluation_reports_perplexity_and_generations(model_dir: Path) -> None:
    spec = parse_spec({"baseModel": {"path": str(model_dir)}, "task": {"type": "causal-lm"},
                       "peft": {"targetModules": ["q_proj", "v_proj"]},
                       "silos": [{"name": "a", "data": {"path": "a.jsonl"}}]})
    model, tok = load_base(spec, str(model_dir))
    model = wrap(model, peft_config(spec, str(model_dir)), 0)
    frame = pd.DataFrame([{"instruction": q, "output": a} for q, a in PAIRS])
    data = encode_causal_lm(frame, DataSpec(path="x"), tok, 64)
    trainer = CausalLMTrainer(model, tok, spec.training, data, data, prompts=["Tell me a joke."], max_new_tokens=4)
    result = trainer.evaluate()
    assert result.extra["perplexity"] == pytest.approx(math.exp(result.loss))
    assert list(result.generations) == ["Tell me a joke."]


def test_tiny_federation_leaves_a_peft_adapter_and_generations(model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsilo.local.runner import run_local

    write_jsonl(tmp_path / "north.jsonl")
    write_jsonl(tmp_path / "south.jsonl", repeat=2)
    job = {
        "apiVersion": "fedsilo.io/v1alpha1", "kind": "FederatedJob", "metadata": {"name": "tiny-lm"},
        "spec": {
            "baseModel": {"path": str(model_dir)},
            "task": {"type": "causal-lm", "evalPrompts": ["What is a computer?"], "maxNewTokens": 4},
            "peft": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "training": {"rounds": 2, "localSteps": 2, "batchSize": 4, "learningRate": 0.01, "maxLength": 64},
            "aggregation": {"minSilos": 2, "roundTimeoutSeconds": 120},
            "silos": [{"name": "north", "data": {"path": "north.jsonl", "validationSplit": 0.25}},
                      {"name": "south", "data": {"path": "south.jsonl", "validationSplit": 0.25}}],
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert run_local(load_job(tmp_path / "job.yaml"), tmp_path, tmp_path / "runs") == 0
    run = tmp_path / "runs" / "tiny-lm" / "latest"
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(run / "adapter"))
    assert adapter.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    lines = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert sorted({line["version"] for line in lines}) == [0, 1, 2]
    assert {line["silo"] for line in lines} == {"north"} and lines[0]["prompt"] == "What is a computer?"
    losses = pd.read_csv(run / "rounds.csv")["loss"]
    assert losses.notna().all() and torch.isfinite(torch.tensor(losses.to_numpy())).all()
