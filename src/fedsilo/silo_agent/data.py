"""A silo's own examples: read CSV / JSONL / Parquet, check columns, split, tokenise once.

Nothing here ever leaves the silo; the aggregator only learns example counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedsilo.spec import DataSpec

if TYPE_CHECKING:
    import torch


class DataError(ValueError):
    """The silo's data file is missing, unreadable or does not fit the job's spec."""


def resolve_path(data: DataSpec, root: Path) -> Path:
    path = Path(data.path)
    return path if path.is_absolute() else root / path


def read_table(data: DataSpec, root: Path) -> pd.DataFrame:
    """Load the silo's file; errors name the file and what is wrong with it."""
    path = resolve_path(data, root)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (data.path={data.path!r}, root {root})")
    fmt = data.resolved_format()
    try:
        if fmt == "csv":
            frame = pd.read_csv(path)
        elif fmt == "jsonl":
            frame = pd.read_json(path, lines=True)
        else:
            frame = pd.read_parquet(path)
    except Exception as exc:  # pandas raises many types; all mean "not readable as fmt"
        raise DataError(f"cannot read {path} as {fmt}: {exc}") from None
    if data.max_examples is not None:
        frame = frame.head(data.max_examples)
    if frame.empty:
        raise DataError(f"{path} has no rows")
    return frame


def require_columns(frame: pd.DataFrame, columns: list[str], path: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")


def label_ids(values: pd.Series, labels: list[str], path: str) -> list[int]:
    """Map label values (names, or integer indices) onto the job's class list."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for value in values:
        key = str(value).strip()
        if key in index:
            out.append(index[key])
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(labels):
            out.append(int(key))
        else:
            raise DataError(f"{path}: label {value!r} is not one of task.labels {labels}")
    return out


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, validation) split of range(n)."""
    import torch  # here, not at import: `fedsilo validate` reads data files without loading torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * fraction)
    if fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class Encoded:
    """Tokenised examples, kept as id lists and padded per batch (dynamic padding)."""

    features: list[dict[str, list[int]]]
    labels: list[Any]  # class ids (classification) or per-token label ids (causal LM)
    soft: list[list[float]] | None = None  # a teacher's logits per example (FedKDLoRA), batched as teacher_logits

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, indices: list[int]) -> Encoded:
        soft = [self.soft[i] for i in indices] if self.soft is not None else None
        return Encoded([self.features[i] for i in indices], [self.labels[i] for i in indices], soft)


def classification_texts(frame: pd.DataFrame, data: DataSpec) -> tuple[list[str], list[str] | None, pd.DataFrame]:
    """(texts, text pairs, the rows they come from): rows with an empty text or label are dropped."""
    columns = [data.text_field, data.label_field] + ([data.text_pair_field] if data.text_pair_field else [])
    require_columns(frame, columns, data.path)
    frame = frame.dropna(subset=columns)
    if frame.empty:
        raise DataError(f"{data.path}: every row has an empty {columns} value")
    texts = frame[data.text_field].astype(str).tolist()
    pairs = frame[data.text_pair_field].astype(str).tolist() if data.text_pair_field else None
    return texts, pairs, frame


def encode_classification(
    frame: pd.DataFrame, data: DataSpec, labels: list[str], tokenizer: Any, max_length: int
) -> Encoded:
    texts, pairs, frame = classification_texts(frame, data)
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
    return Encoded(features, label_ids(frame[data.label_field], labels, data.path))


def batches(
    data: Encoded, batch_size: int, tokenizer: Any, order: list[int] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Pad each batch to its own longest example; `order` shuffles (train) or groups by length."""
    import torch

    order = order if order is not None else sorted(range(len(data)), key=lambda i: len(data.features[i]["input_ids"]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad([data.features[i] for i in idx], return_tensors="pt")
        batch["labels"] = torch.tensor([data.labels[i] for i in idx])
        if data.soft is not None:
            batch["teacher_logits"] = torch.tensor([data.soft[i] for i in idx], dtype=torch.float32)
        out.append(dict(batch))
    return out
