"""Instruction tuning of causal language models: rendering, answer-only labels, collation, generation.

Rows are either instruction/input/output columns or chat `messages` lists. They are rendered
with the tokenizer's chat template (a plain "### Instruction / ### Response" template when it
has none); only assistant tokens carry loss, prompt and padding are labelled -100.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch

from fedsilo.silo_agent.data import DataError, Encoded, require_columns
from fedsilo.silo_agent.trainer import EvalResult, Trainer
from fedsilo.spec import DataSpec, FederatedJobSpec, SiloSpec, TrainingSpec

IGNORE = -100
Message = dict[str, str]


def fallback_render(messages: list[Message], generation_prompt: bool, eos: str) -> str:
    """The plain template for tokenizers without a chat template (system text goes first)."""
    parts = []
    for msg in messages:
        if msg["role"] == "system":
            parts.append(f"{msg['content']}\n\n")
        elif msg["role"] == "user":
            parts.append(f"### Instruction:\n{msg['content']}\n\n### Response:\n")
        else:
            parts.append(f"{msg['content']}{eos}\n\n")
    if not generation_prompt and messages and messages[-1]["role"] == "user":
        parts[-1] = parts[-1].removesuffix("### Response:\n")
    return "".join(parts)


def render(tokenizer: Any, messages: list[Message], generation_prompt: bool = False) -> str:
    """Conversation as text, with the assistant header appended when `generation_prompt`."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))
    return fallback_render(messages, generation_prompt, tokenizer.eos_token or "")


def uses_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def row_messages(row: pd.Series, data: DataSpec, chat: bool) -> list[Message]:
    """One row as a chat: either its messages list, or user = instruction (+ input), assistant = output."""
    if chat:
        messages = row[data.messages_field]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise DataError(f"{data.path}: column {data.messages_field!r} must hold lists of {{role, content}}")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    prompt = str(row[data.instruction_field]).strip()
    extra = row.get(data.input_field)
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra.strip()}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row[data.output_field]).strip()}]


def answer_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of every assistant turn (with its end marker)."""
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            start = len(render(tokenizer, messages[:i], generation_prompt=True))
            end = len(render(tokenizer, messages[:i + 1]).rstrip("\n"))  # answer + end marker, not the newline
            spans.append((start, end))
    return render(tokenizer, messages), spans


def encode_example(tokenizer: Any, messages: list[Message], max_length: int) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels (answer tokens only), truncated to max_length."""
    text, spans = answer_spans(tokenizer, messages)
    special = not uses_template(tokenizer)  # a chat template writes its own special tokens
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True, truncation=True,
                        max_length=max_length)
        labels = [tok if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE
                  for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    else:  # slow tokenizers: token boundaries from rendering prefixes
        enc = tokenizer(text, add_special_tokens=special, truncation=True, max_length=max_length)
        labels = [IGNORE] * len(enc["input_ids"])
        for start, end in spans:
            lo = len(tokenizer(text[:start], add_special_tokens=special)["input_ids"])
            hi = len(tokenizer(text[:end], add_special_tokens=special)["input_ids"])
            for j in range(lo, min(hi, len(labels))):
                labels[j] = enc["input_ids"][j]
    return {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"]), "labels": labels}


def encode_causal_lm(frame: pd.DataFrame, data: DataSpec, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenise every row once; rows whose answer is cut off entirely by max_length are dropped."""
    chat = data.messages_field in frame.columns
    if not chat:
        require_columns(frame, [data.instruction_field, data.output_field], data.path)
        frame = frame.dropna(subset=[data.instruction_field, data.output_field])
    features = []
    for _, row in frame.iterrows():
        example = encode_example(tokenizer, row_messages(row, data, chat), max_length)
        if any(label != IGNORE for label in example["labels"]):
            features.append(example)
    if not features:
        raise DataError(f"{data.path}: no example keeps an answer token within training.maxLength={max_length}")
    return Encoded(features, [f["labels"] for f in features])


def causal_batches(data: Encoded, batch_size: int, tokenizer: Any, order: list[int] | None = None
                   ) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches; padding gets attention 0 and label -100. Default order groups by length."""
    order = order if order is not None else sorted(range(len(data)), key=lambda i: len(data.features[i]["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(order), batch_size):
        rows = [data.features[i] for i in order[start:start + batch_size]]
        width = max(len(r["input_ids"]) for r in rows)
        out.append({
            key: torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
            for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", IGNORE))
        })
    return out


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> dict[str, str]:
    """Greedy answer to each prompt (rendered as a one-turn chat), prompt by prompt."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for prompt in prompts:
        text = render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=not uses_template(tokenizer), return_tensors="pt").to(device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out[prompt] = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return out


def generation_prompts(spec: FederatedJobSpec, silo: SiloSpec) -> list[str]:
    """The eval prompts this silo answers: evaluators do, else only the first trainer (greedy output is identical)."""
    evaluators = [s.name for s in spec.silos if s.role == "evaluator"]
    chosen = evaluators or [spec.trainers()[0].name]
    return list(spec.task.eval_prompts) if silo.name in chosen else []


class CausalLMTrainer(Trainer):
    """The generic trainer with answer-only batches; evaluation adds perplexity and the prompts' generations."""

    def __init__(self, model: Any, tokenizer: Any, training: TrainingSpec, train: Encoded, evaluation: Encoded,
                 *, prompts: list[str], max_new_tokens: int) -> None:
        super().__init__(model, tokenizer, training, train, evaluation, classification=False, batcher=causal_batches)
        self.prompts, self.max_new_tokens = prompts, max_new_tokens

    def evaluate(self) -> EvalResult:
        result = super().evaluate()
        if self.prompts:
            started = time.perf_counter()
            result.generations = generate(self.model, self.tokenizer, self.prompts, self.max_new_tokens)
            result.extra["generate_seconds"] = time.perf_counter() - started
        return result
