"""Base model loading (offline only) and the PEFT wrapping every silo applies identically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from fedsilo.adapters import State
from fedsilo.silo_agent import hardware
from fedsilo.spec import FederatedJobSpec

log = logging.getLogger("fedsilo.silo")


class ModelError(RuntimeError):
    """The base model cannot be loaded offline, or the PEFT recipe does not fit it."""


def peft_config(spec: FederatedJobSpec, model_path: str, rank: int | None = None) -> PeftConfig:
    """The PEFT config of this job (pure: no model needed). `rank` narrows LoRA for weak silos."""
    p = spec.peft
    task = TaskType.SEQ_CLS if spec.task.type == "sequence-classification" else TaskType.CAUSAL_LM
    if p.method in ("lora", "dora"):
        r = rank or p.r
        # A silo with a smaller rank keeps alpha/r equal to the global scale.
        alpha = p.alpha * r / p.r
        # peft annotates lora_alpha as int but computes alpha / r in floats: a float keeps the scale exact
        return LoraConfig(task_type=task, r=r, lora_alpha=alpha, lora_dropout=p.dropout,  # type: ignore[arg-type]
                          target_modules=list(p.target_modules), use_dora=p.method == "dora",
                          base_model_name_or_path=model_path)
    if p.method == "ia3":
        return IA3Config(task_type=task, target_modules=list(p.target_modules),
                         feedforward_modules=list(p.feedforward_modules), base_model_name_or_path=model_path)
    if p.method == "prompt-tuning":
        text = p.prompt_init == "text"
        return PromptTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
                                  prompt_tuning_init_text=p.prompt_init_text if text else None,
                                  tokenizer_name_or_path=model_path if text else None,
                                  base_model_name_or_path=model_path)
    raise ModelError(f"peft.method {p.method!r} is not supported for task {spec.task.type!r}")


def load_base(spec: FederatedJobSpec, model_path: str, cuda: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder or the local hub cache; never downloads.

    The head follows `task.type`; precision, 4-bit loading and checkpointing follow `training`.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    common: dict[str, Any] = {"revision": spec.base_model.revision, "local_files_only": True}
    if spec.base_model.gguf_file:
        common["gguf_file"] = spec.base_model.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, **common)
        torch.manual_seed(spec.training.seed)  # the fresh head is identical on every silo
        loading = {**common, **hardware.load_kwargs(spec.training, cuda)}
        if spec.task.type == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(model_path, **loading)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=len(spec.task.labels), id2label=dict(enumerate(spec.task.labels)),
                label2id={n: i for i, n in enumerate(spec.task.labels)}, **loading,
            )
    except OSError as exc:
        raise ModelError(f"cannot load base model {model_path!r} offline: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return hardware.prepare_base(model, spec.training, cuda), tokenizer


def wrap(model: Any, config: PeftConfig, seed: int) -> Any:
    torch.manual_seed(seed)  # identical adapter initialisation everywhere
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"the PEFT recipe does not fit this model: {exc}") from None
    # One declared dtype end to end: the adapter (LoRA factors and the copied classifier head
    # alike) trains and travels in fp32 whatever the base weights are (bf16/fp16 base, 4-bit
    # QLoRA); autocast runs the forward in low precision. A bf16 head would make every fp32
    # delta a `wrong_dtype` upload.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("adapter: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return peft_model


def adapter_state(model: Any) -> State:
    """The trainable adapter state exactly as PEFT saves it (names without the adapter name)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: Any, state: State) -> None:
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # shape mismatch, e.g. prompt embeddings (loaded strictly by PEFT)
        raise ModelError(f"adapter tensors do not fit the model: {exc}") from None
    markers = ("lora", "modules_to_save", "ia3_")  # prompt_embeddings is always "unexpected" here
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if any(mark in k for mark in markers)]
    if unexpected:
        raise ModelError(f"adapter tensors do not fit the model: {unexpected[:5]}")


def save_peft_adapter(state: State, config: PeftConfig, folder: Path) -> None:
    """Write a standard PEFT adapter folder (loadable by PeftModel.from_pretrained)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
