"""Big-model switches of a silo: device checks, precision, 4-bit loading, checkpointing, memory estimate.

`check_device` and `memory_estimate` are pure; the rest adjust a loaded model in place.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from fedsilo.spec import TrainingSpec

log = logging.getLogger("fedsilo.silo")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MB = 1024 * 1024


class HardwareError(RuntimeError):
    """The job asks for a device feature this silo does not have; the message names the spec field."""


def check_device(training: TrainingSpec, cuda: bool) -> None:
    """Refuse at silo start what cannot run here (fp16 autocast and 4-bit need CUDA; bf16 may run on CPU)."""
    if training.load_in_4bit and not cuda:
        raise HardwareError("training.loadIn4bit needs a CUDA GPU (bitsandbytes 4-bit); this silo has none. "
                            "Set training.loadIn4bit: false or schedule the silo on a GPU node.")
    if training.precision == "fp16" and not cuda:
        raise HardwareError("training.precision fp16 needs a CUDA GPU; this silo has none. "
                            "Use training.precision: bf16 or fp32 on CPU silos.")
    if training.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise HardwareError("training.loadIn4bit needs bitsandbytes: pip install 'fedsilo[gpu]' "
                            "(or the image's cuda target)")


def device(cuda: bool) -> torch.device:
    return torch.device("cuda" if cuda else "cpu")


def load_kwargs(training: TrainingSpec, cuda: bool) -> dict[str, Any]:
    """Keyword arguments for `from_pretrained`: weight dtype, 4-bit quantisation, device placement."""
    dtype = DTYPES[training.precision] if cuda else torch.float32  # CPU keeps fp32 weights (bf16: autocast only)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if training.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = DTYPES[training.precision] if training.precision != "fp32" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": 0}
    return kwargs


def prepare_base(model: Any, training: TrainingSpec, cuda: bool) -> Any:
    """Before PEFT wrapping: k-bit preparation, gradient checkpointing, move to the GPU."""
    if training.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cuda:
        model.to(device(cuda))
    return model


def autocast_forward(model: Any, training: TrainingSpec, cuda: bool) -> Any:
    """Run every forward pass under torch.autocast (bf16/fp16); the trainable adapter stays fp32."""
    if training.precision == "fp32":
        return model
    context = torch.autocast(device_type=device(cuda).type, dtype=DTYPES[training.precision])
    model.forward = context(model.forward)
    return model


@dataclass(frozen=True)
class MemoryEstimate:
    """Rough training memory of one silo, in bytes."""

    weights: int
    adapter: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"weights {self.weights / MB:.0f} MB + adapter {self.adapter / MB:.1f} MB"
                f" + grads/optimizer {self.optimizer / MB:.1f} MB + activations ~{self.activations / MB:.0f} MB"
                f" = ~{self.total / MB:.0f} MB")


def memory_estimate(weight_bytes: int, trainable: int, *, batch: int, tokens: int, hidden: int, layers: int,
                    vocab: int, precision: str, checkpointing: bool) -> MemoryEstimate:
    """Weights as loaded + fp32 adapter + its gradient and two AdamW moments + activations.

    Activations follow the usual transformer estimate (~34 bytes x tokens x hidden per layer in
    16-bit, doubled in fp32); with checkpointing only each layer's input plus one layer are kept.
    The fp32 logits (batch x tokens x vocab) come on top.
    """
    act_bytes = 4 if precision == "fp32" else 2
    per_layer = batch * tokens * hidden * 17 * act_bytes
    stored = (batch * tokens * hidden * act_bytes * layers + per_layer) if checkpointing else per_layer * layers
    logits = batch * tokens * vocab * 4 * 2  # logits and their gradient
    return MemoryEstimate(weights=weight_bytes, adapter=trainable * 4, optimizer=trainable * 4 * 3,
                          activations=stored + logits)


def estimate_for(model: Any, training: TrainingSpec) -> MemoryEstimate:
    """`memory_estimate` for a wrapped model and this job's batch shape."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    config = model.config if hasattr(model, "config") else model.base_model.config
    return memory_estimate(
        frozen_bytes, trainable, batch=training.batch_size, tokens=training.max_length,
        hidden=int(getattr(config, "hidden_size", 768)), layers=int(getattr(config, "num_hidden_layers", 12)),
        vocab=int(getattr(config, "vocab_size", 0)) if _has_lm_head(model) else 0,
        precision=training.precision, checkpointing=training.gradient_checkpointing,
    )


def _has_lm_head(model: Any) -> bool:
    return any(name.endswith("lm_head") for name, _ in model.named_modules())
