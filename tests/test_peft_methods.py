"""One table, every PEFT method: state travels as bytes, loads back, aggregates, saves, exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.tiny_causal import build_model_folder

from fedsilo.adapters import delta, from_bytes, to_bytes
from fedsilo.local.export import ExportError, export
from fedsilo.silo_agent.model import adapter_state, load_adapter_state, load_base, peft_config, save_peft_adapter, wrap
from fedsilo.spec import FederatedJobSpec, SpecError, parse_spec
from fedsilo.strategies import create

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "r": 4, "targetModules": ["q_proj", "v_proj"]},
    "dora": {"method": "dora", "r": 4, "targetModules": ["q_proj", "v_proj"]},
    "ia3": {"method": "ia3", "targetModules": ["k_proj", "v_proj", "down_proj"], "feedforwardModules": ["down_proj"]},
    "prompt-tuning": {"method": "prompt-tuning", "numVirtualTokens": 4},
}
TASKS = {"causal-lm": {"type": "causal-lm"}, "sequence-classification": {"labels": ["neg", "pos", "other"]}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("tiny-llama"))


def spec_for(model_dir: Path, method: str, task: str) -> FederatedJobSpec:
    return parse_spec({"baseModel": {"path": str(model_dir)}, "task": TASKS[task], "peft": METHODS[method],
                       "silos": [{"name": "a", "data": {"path": "a.jsonl"}}]})


def wrapped(spec: FederatedJobSpec, model_dir: Path) -> Any:
    model, _ = load_base(spec, str(model_dir))
    return wrap(model, peft_config(spec, str(model_dir)), seed=0).eval()


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


BATCH = {"input_ids": torch.tensor([[5, 9, 30, 41, 7, 12]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("method", list(METHODS))
def test_state_round_trips_through_bytes_load_and_peft_folder(model_dir: Path, method: str, task: str,
                                                             tmp_path: Path) -> None:
    spec = spec_for(model_dir, method, task)
    sender, receiver = wrapped(spec, model_dir), wrapped(spec, model_dir)
    trained = perturbed(adapter_state(sender), seed=1)
    load_adapter_state(sender, trained)
    if task == "sequence-classification":  # the fresh head is trainable and travels too
        assert any("score" in k for k in trained), sorted(trained)

    load_adapter_state(receiver, from_bytes(to_bytes(adapter_state(sender))))
    for name, tensor in adapter_state(receiver).items():
        torch.testing.assert_close(tensor, trained[name])
    with torch.no_grad():
        torch.testing.assert_close(receiver(**BATCH).logits, sender(**BATCH).logits)

    from peft import PeftModel

    save_peft_adapter(trained, peft_config(spec, str(model_dir)), tmp_path / "adapter")
    base, _ = load_base(spec, str(model_dir))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**BATCH).logits, sender(**BATCH).logits)


@pytest.mark.parametrize("strategy", ["fedavg", "lora-exact"])
@pytest.mark.parametrize("method", ["ia3", "prompt-tuning"])
def test_strategies_average_non_lora_adapters(model_dir: Path, method: str, strategy: str) -> None:
    model = wrapped(spec_for(model_dir, method, "causal-lm"), model_dir)
    start = adapter_state(model)
    one, two = perturbed(start, 1), perturbed(start, 2)
    algo = create(strategy)
    acc = algo.accumulator(start)
    algo.add(acc, delta(one, start), 1.0)
    algo.add(acc, delta(two, start), 3.0)
    result = algo.aggregate(start, acc, {}).state
    for name in start:
        torch.testing.assert_close(result[name], (one[name] + 3 * two[name]) / 4, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_export_merges_into_a_plain_model(model_dir: Path, method: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = spec_for(model_dir, method, "causal-lm")
    model = wrapped(spec, model_dir)
    trained = perturbed(adapter_state(model), seed=3)
    load_adapter_state(model, trained)
    save_peft_adapter(trained, peft_config(spec, str(model_dir)), tmp_path / "adapter")
    out = export(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert (out / "tokenizer.json").is_file()
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**BATCH).logits, model(**BATCH).logits, atol=1e-4, rtol=1e-4)


def test_export_refuses_prompt_tuning_with_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    spec = spec_for(model_dir, "prompt-tuning", "causal-lm")
    model = wrapped(spec, model_dir)
    save_peft_adapter(adapter_state(model), peft_config(spec, str(model_dir)), tmp_path / "adapter")
    with pytest.raises(ExportError, match="PROMPT_TUNING adapter cannot be merged"):
        export(tmp_path, tmp_path / "merged")  # a run-like folder holding adapter/


def test_export_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"adapter_config\.json"):
        export(tmp_path, tmp_path / "merged")


@pytest.mark.parametrize(("peft", "message"), [
    ({"method": "ia3", "targetModules": ["q_proj"], "feedforwardModules": ["down_proj"]},
     "feedforwardModules"),
    ({"method": "prompt-tuning", "promptInit": "text"}, "promptInitText"),
    ({"method": "prefix"}, "spec.peft.method"),
])
def test_peft_spec_errors_name_the_field(peft: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({"baseModel": {"path": "m"}, "task": {"type": "causal-lm"}, "peft": peft,
                    "silos": [{"name": "a", "data": {"path": "a.jsonl"}}]})
