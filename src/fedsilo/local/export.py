"""Merge a finished job's PEFT adapter into its base model and save a plain model folder.

`fedsilo export runs/<job> --out merged/` loads the base model (`--base`, else where the run
found it, else the name the job gave it), applies the adapter, merges it (LoRA, DoRA, IA3) and
writes model + tokenizer, loadable with `AutoModelFor...from_pretrained(out)` and no PEFT at
all. A classifier keeps the job's class names as its `id2label`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MERGEABLE = {"LORA", "IA3"}  # DoRA is LoRA with use_dora
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(RuntimeError):
    """The adapter cannot be found, loaded or merged; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """Where an export reads from: the adapter folder, the job document and the adapter's fedsilo.json."""

    adapter: Path
    job: dict[str, Any] | None
    meta: dict[str, Any]


def find_source(path: Path) -> Source:
    """Accept an adapter folder, a run folder (holding adapter/ and job.json) or runs/<job> (its latest run)."""
    for adapter in (path, path / "adapter", path / "latest" / "adapter"):
        if (adapter / "adapter_config.json").is_file():
            job_file = adapter.parent / "job.json"
            job = json.loads(job_file.read_text()) if job_file.is_file() else None
            meta_file = adapter / "fedsilo.json"
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            return Source(adapter, job, meta)
    raise ExportError(f"{path}: neither a PEFT adapter folder (adapter_config.json) nor a run folder with adapter/")


def base_candidates(source: Source, config: Any, base: str | None) -> list[str]:
    """Where to look for the base model, in order: --base, where the run found it, the job's name for it."""
    if base:
        return [base]
    recorded = (source.meta.get("base_model") or {}).get("resolved_path")
    named = config.base_model_name_or_path
    found = [p for p in (recorded, named) if p]
    return list(dict.fromkeys(found))  # once each, in order


def _classes(source: Source, state_path: Path) -> list[str]:
    """Class names of a sequence-classification adapter: fedsilo.json, job.json, else the head's output size."""
    id2label = source.meta.get("id2label") or {}
    if id2label:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    labels = ((source.job or {}).get("spec", {}).get("task", {}) or {}).get("labels")
    if labels:
        return [str(x) for x in labels]
    from safetensors import safe_open

    with safe_open(str(state_path), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if any(head in key for head in ("classifier", "score")) and key.endswith("weight"):
                rows = int(fh.get_slice(key).get_shape()[0])
                return [f"LABEL_{i}" for i in range(rows)]
    raise ExportError("cannot tell the number of classes: no job.json next to the adapter and no head weights in it")


def load_base(source: Source, config: Any, base: str | None, dtype: torch.dtype) -> tuple[Any, Any]:
    """The base model (head by the adapter's task type) and its tokenizer, offline."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    candidates = base_candidates(source, config, base)
    if not candidates:
        raise ExportError("the adapter config names no base model; pass --base FOLDER")
    path = next((p for p in candidates if Path(p).is_dir()), candidates[-1])  # a folder here, else a hub id
    extra: dict[str, Any] = {"local_files_only": True}
    gguf = ((source.job or {}).get("spec", {}).get("baseModel", {}) or {}).get("ggufFile")
    if gguf:
        extra["gguf_file"] = gguf
    task = str(config.task_type or "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        if task == "SEQ_CLS":
            labels = _classes(source, source.adapter / "adapter_model.safetensors")
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)}, **extra)
        elif task == "CAUSAL_LM":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
        else:
            raise ExportError(f"adapter task_type {task!r} is not one fedsilo exports (CAUSAL_LM, SEQ_CLS)")
    except OSError as exc:
        tried = " or ".join(repr(p) for p in candidates)
        raise ExportError(f"cannot load base model {tried} offline ({exc}); pass --base FOLDER") from None
    return model, tokenizer


def export(path: Path, out: Path, base: str | None = None, dtype: str = "fp32") -> Path:
    """Merge the adapter at `path` into its base model; write model + tokenizer to `out`."""
    from peft import PeftConfig, PeftModel

    source = find_source(path)
    config = PeftConfig.from_pretrained(str(source.adapter))
    kind = str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type)
    if kind not in MERGEABLE:
        raise ExportError(f"a {kind} adapter cannot be merged into the base weights (only LoRA, DoRA and IA3 can); "
                          f"serve the base model with the adapter instead: PeftModel.from_pretrained(base, "
                          f"{str(source.adapter)!r})")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(DTYPES)}")
    model, tokenizer = load_base(source, config, base, torch.float32)  # merge in fp32, then cast
    merged = PeftModel.from_pretrained(model, str(source.adapter)).merge_and_unload().to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
