"""FedKDLoRA's teacher: a frozen classifier fine-tuned on public data, distilled on every silo.

After the FedKD seed's design (a strong teacher, a small federated LoRA student): the teacher
may be a different and larger architecture (e.g. all-mpnet-base-v2 teaching MiniLM) with its
own tokenizer. It never trains during the federation, so a silo computes the teacher's logits
for its training examples once at start (`teacher_logits`) and each local step adds
alpha * T^2 * KL(teacher || student) to the task loss: one extra forward pass per example
per job instead of per step. Nothing about the teacher travels.

`fit_teacher` is the public-data pre-training (`fedsilo teacher`): full fine-tuning of a
sequence-classification model on a public CSV/JSONL/Parquet file with the job's labels,
saved as a plain model folder the spec's `distillation.teacher.path` names.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fedsilo.silo_agent.data import batches, classification_texts, encode_classification, split_indices
from fedsilo.silo_agent.model import ModelError
from fedsilo.spec import DataSpec, FederatedJobSpec, TeacherSpec

log = logging.getLogger("fedsilo.silo")
GENERIC_LABEL = "LABEL_"  # what transformers names classes nobody named


def load_teacher(teacher: TeacherSpec, labels: list[str]) -> tuple[Any, Any]:
    """(model, tokenizer) of the teacher, offline; its head must predict exactly `labels`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    common: dict[str, Any] = {"revision": teacher.revision, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher.path, **common)
        model = AutoModelForSequenceClassification.from_pretrained(teacher.path, dtype=torch.float32, **common)
    except OSError as exc:
        raise ModelError(f"cannot load the teacher {teacher.path!r} offline: {exc}") from None
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    named = not all(str(n).startswith(GENERIC_LABEL) for n in names)
    if model.config.num_labels != len(labels) or (named and names != labels):
        raise ModelError(
            f"the teacher {teacher.path!r} predicts {names}, the job's task.labels are {labels}: "
            "fine-tune it for these labels first (fedsilo teacher)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@torch.no_grad()
def teacher_logits(
    model: Any, tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int, batch_size: int = 64
) -> list[list[float]]:
    """The teacher's logits for every text (pair), in order, with its own tokenizer."""
    out: list[list[float]] = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        pair = pairs[start : start + batch_size] if pairs is not None else None
        batch = tokenizer(chunk, pair, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        out.extend(model(**batch).logits.float().tolist())
    return out


def silo_soft_targets(spec: FederatedJobSpec, frame: pd.DataFrame, data: DataSpec, root: Path) -> list[list[float]]:
    """The teacher's logits for every row `encode_classification` keeps of the silo's table.

    A relative teacher path resolves against `root` (the silo's data root) when it exists there.
    """
    assert spec.distillation is not None
    teacher = spec.distillation.teacher
    if not Path(teacher.path).is_absolute() and (root / teacher.path).exists():
        teacher = teacher.model_copy(update={"path": str(root / teacher.path)})
    started = time.perf_counter()
    model, tokenizer = load_teacher(teacher, spec.task.labels)
    texts, pairs, _ = classification_texts(frame, data)
    soft = teacher_logits(model, tokenizer, texts, pairs, teacher.max_length or spec.training.max_length)
    log.info("distillation: teacher %s scored %d examples in %.1fs", teacher.path, len(soft),
             time.perf_counter() - started)
    return soft


@dataclass
class TeacherReport:
    """What `fit_teacher` did, also written as `fedsilo-teacher.json` beside the model."""

    base: str
    public_examples: int
    held_out_examples: int
    steps: int
    seconds: float
    held_out_accuracy: float | None


def fit_teacher(
    base: str,
    public: pd.DataFrame,
    data: DataSpec,
    labels: list[str],
    out: Path,
    *,
    steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 3e-5,
    max_length: int = 128,
    held_out: float = 0.1,
    seed: int = 0,
) -> TeacherReport:
    """Fine-tune `base` (all its weights) on the public table and save it to `out` with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, dtype=torch.float32, local_files_only=True,
        )
    except OSError as exc:
        raise ModelError(f"cannot load {base!r} offline: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    encoded = encode_classification(public, data, labels, tokenizer, max_length)
    train_idx, eval_idx = split_indices(len(encoded), held_out, seed)
    train, evaluation = encoded.subset(train_idx), encoded.subset(eval_idx)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    started, done = time.perf_counter(), 0
    model.train()
    while done < steps:
        order = torch.randperm(len(train), generator=gen).tolist()
        for batch in batches(train, batch_size, tokenizer, order):
            model(**batch).loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    accuracy = _accuracy(model, tokenizer, evaluation) if len(evaluation) else None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    report = TeacherReport(base, len(train), len(evaluation), steps, time.perf_counter() - started, accuracy)
    (out / "fedsilo-teacher.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


@torch.no_grad()
def _accuracy(model: Any, tokenizer: Any, data: Any) -> float:
    model.eval()
    correct = sum(int((model(**b).logits.argmax(-1) == b["labels"]).sum()) for b in batches(data, 64, tokenizer))
    return correct / len(data)
