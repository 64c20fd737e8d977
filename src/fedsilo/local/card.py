"""What an adapter folder says about itself: `README.md` (the model card) and `fedsilo.json`.

Both are pure functions of one `AdapterInfo`: the job, the adapter version and its
checksum, the per-round table, and the aggregator's status when known. The card follows
the PEFT / Hugging Face Hub convention (YAML front matter, then Markdown); `fedsilo.json`
holds the same facts for programs (`fedsilo export` reads the labels and the base model's
resolved path from it). Silos appear by name and role only: never a data path, never an
organisation's example counts.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

import yaml

from fedsilo.api import models as m
from fedsilo.api.models import JobStatus
from fedsilo.spec import FederatedJob

CARD = "README.md"
METADATA = "fedsilo.json"
FORMAT = 1  # fedsilo.json layout version
PEFT_TAG = {"lora": "lora", "dora": "dora", "ia3": "ia3", "prompt-tuning": "prompt-tuning"}


@dataclass(frozen=True)
class AdapterInfo:
    """Everything the card says, gathered by whoever saves the adapter (a local run or a pull)."""

    job: FederatedJob
    version: int  # global adapter version: the result of round `version`
    sha256: str  # of adapter_model.safetensors, which is the aggregator's blob byte for byte
    outcome: str  # running | succeeded | failed | interrupted | pulled
    table: list[dict[str, Any]]  # report.rows: row r is the global adapter after round r
    status: JobStatus | None = None
    base_resolved: str | None = None  # where the base model was found when the adapter was saved
    source: dict[str, Any] = field(default_factory=dict)  # {"kind": "local"} or {"kind": "pull", "url": ...}
    saved_at: str = ""
    message: str = ""
    generations: dict[str, dict[str, str]] = field(default_factory=dict)  # silo -> prompt -> text, for `version`


def labels(job: FederatedJob) -> list[str]:
    return list(job.spec.task.labels) if job.spec.task.type == "sequence-classification" else []


def privacy(job: FederatedJob, status: JobStatus | None) -> dict[str, Any]:
    """What the aggregator reports it enforces; without a status, what the spec asks for."""
    if status is not None:
        return dict(status.privacy.model_dump())
    dp = job.spec.privacy.dp
    return m.PrivacyStatus(
        secure_aggregation=job.spec.aggregation.secure,
        dp=dp is not None,
        delta=dp.delta if dp else None,
        target_epsilon=dp.target_epsilon if dp else None,
        noise_multiplier=dp.noise_multiplier if dp else None,
        clip_norm=dp.clip_norm if dp else None,
    ).model_dump()


def privacy_sentence(p: dict[str, Any]) -> str:
    secure = (
        "secure aggregation on: the aggregator only ever saw the sum of the silos' updates"
        if p.get("secure_aggregation")
        else "secure aggregation off: the aggregator saw each silo's update"
    )
    if not p.get("dp"):
        return f"{secure}; differential privacy off."
    parts = [f"noise multiplier {p['noise_multiplier']:g}" if p.get("noise_multiplier") is not None else "",
             f"clip norm {p['clip_norm']:g}" if p.get("clip_norm") is not None else ""]
    spent = (f"ε = {p['epsilon']:.3g} spent at δ = {p['delta']:g}" if p.get("epsilon") is not None
             and p.get("delta") is not None else "ε spent not reported")
    target = f" (target ε {p['target_epsilon']:g})" if p.get("target_epsilon") is not None else ""
    detail = ", ".join(x for x in parts if x)
    return f"{secure}; differential privacy on ({detail}): {spent}{target}."


def _silos(job: FederatedJob) -> list[dict[str, str]]:
    return [{"name": s.name, "role": s.role} for s in job.spec.silos]


def _rows(info: AdapterInfo) -> list[dict[str, Any]]:
    return [r for r in info.table if r["round"] <= info.version]


def metadata(info: AdapterInfo) -> dict[str, Any]:
    """fedsilo.json: the card's facts as data."""
    spec, names = info.job.spec, labels(info.job)
    agg = spec.aggregation
    return {
        "format": FORMAT,
        "job": info.job.metadata.name,
        "adapter_version": info.version,
        "rounds": spec.training.rounds,
        "outcome": info.outcome,
        "message": info.message,
        "sha256": info.sha256,
        "base_model": {
            "name": spec.base_model.path,
            "resolved_path": info.base_resolved,
            "revision": spec.base_model.revision,
            "gguf_file": spec.base_model.gguf_file,
        },
        "task": spec.task.type,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "peft": spec.peft.model_dump(mode="json", by_alias=True),
        "training": spec.training.model_dump(mode="json", by_alias=True),
        "aggregation": {"strategy": agg.strategy, "params": dict(agg.params), "mode": agg.mode,
                        "minSilos": agg.min_silos, "fraction": agg.fraction},
        "silos": _silos(info.job),
        "privacy": privacy(info.job, info.status),
        "rounds_table": _rows(info),
        "source": info.source,
        "saved_at": info.saved_at,
        "fedsilo_version": _version(),
    }


def _version() -> str:
    try:
        return importlib.metadata.version("fedsilo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _state(info: AdapterInfo) -> str:
    rounds, v = info.job.spec.training.rounds, info.version
    status = info.status
    if info.outcome == "succeeded" or (status is not None and status.phase == "Succeeded" and v >= status.rounds):
        return f"the final global adapter: round {v} of {max(rounds, v)}, the job finished."
    if info.outcome == "interrupted":
        return (f"**not final**: the run was interrupted after round {v} of {rounds}; "
                "this is the global adapter after that round.")
    if info.outcome == "failed":
        why = f" ({info.message})" if info.message else ""
        return f"**not final**: the job failed{why}; this is the global adapter after round {v} of {rounds}."
    phase = (f"the job was {status.phase} at round {status.round} of {status.rounds}" if status
             else "the job was running")
    return f"global adapter version {v} (after round {v}); {phase} when it was saved."


def _results(info: AdapterInfo) -> list[str]:
    rows = _rows(info)
    split = next((r["split"] for r in reversed(rows) if r.get("split")), None)
    who = {"test": "test split: the evaluator silo's held-out data, never trained on",
           "validation": "validation split: the mean over the trainer silos' held-out validation rows"}
    lines = ["## Results", ""]
    if split:
        lines += [f"Metrics per global adapter version on the {who.get(split, split)}. "
                  "Round 0 is the untrained starting adapter.", ""]
    lines += ["| round | split | accuracy | loss | silos' updates | round seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r.get('split') or '-'} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('loss'))} "
                     f"| {r.get('updates') if r.get('updates') is not None else '-'} "
                     f"| {_fmt(r.get('round_seconds'), '.1f')} |")
    return [*lines, ""]


def _loading(info: AdapterInfo) -> list[str]:
    spec, names = info.job.spec, labels(info.job)
    base = spec.base_model.path
    if spec.task.type == "sequence-classification":
        id2label = {i: n for i, n in enumerate(names)}
        label2id = {n: i for i, n in enumerate(names)}
        load = [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f"base = AutoModelForSequenceClassification.from_pretrained(\n    {base!r}, num_labels={len(names)},"
            f"\n    id2label={id2label!r},\n    label2id={label2id!r},\n)",
        ]
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"base = AutoModelForCausalLM.from_pretrained({base!r})"]
    code = ["```python", "from peft import PeftModel", *load,
            "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")",
            f"tokenizer = AutoTokenizer.from_pretrained({base!r})", "```"]
    where = (f" On the machine that saved this adapter it was `{info.base_resolved}`."
             if info.base_resolved and info.base_resolved != base else "")
    return ["## How to load", "", *code, "",
            f"`{base}` is the base model as the job names it (`spec.baseModel.path`: a hub id, or a folder "
            f"relative to the job file or inside each silo).{where} Any copy of the same model works. "
            "`fedsilo export <run folder> --out merged/` merges the adapter into a plain model folder.", ""]


def _generations(info: AdapterInfo) -> list[str]:
    """Causal LM: what this version answers to the job's fixed evaluation prompts (one silo's view)."""
    if not info.generations:
        return []
    silo, answers = sorted(info.generations.items())[0]
    lines = [f"## Generations of version {info.version} (spec.task.evalPrompts, greedy, on silo {silo})", ""]
    lines += [f"- **{prompt}** → {text.strip()}" for prompt, text in list(answers.items())[:4]]
    return [*lines, ""]


def render(info: AdapterInfo) -> str:
    """The model card (README.md of the adapter folder)."""
    spec, names = info.job.spec, labels(info.job)
    p, t, agg = spec.peft, spec.training, spec.aggregation
    trainers = [s.name for s in spec.silos if s.role == "trainer"]
    evaluators = [s.name for s in spec.silos if s.role == "evaluator"]
    front = {
        "library_name": "peft",
        "base_model": spec.base_model.path,
        "pipeline_tag": "text-classification" if names else "text-generation",
        "tags": ["fedsilo", "federated-learning", "peft", PEFT_TAG[p.method]],
    }
    recipe = (f"{p.method}, r {p.r}, alpha {p.alpha:g}, dropout {p.dropout:g}, target modules "
              f"{', '.join(p.target_modules)}" if p.method in ("lora", "dora")
              else f"{p.method}, target modules {', '.join(p.target_modules)}" if p.method == "ia3"
              else f"{p.method}, {p.num_virtual_tokens} virtual tokens")
    steps = f"{t.local_steps} local steps" if t.local_steps else f"{t.local_epochs:g} local epoch(s)"
    params = ", ".join(f"{k} {v:g}" for k, v in agg.params.items())
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {info.job.metadata.name}: federated {p.method} adapter, version {info.version}", "",
        f"A PEFT adapter for `{spec.base_model.path}`, fine-tuned with federated learning by fedsilo: "
        f"{len(trainers)} silo(s) trained it on their own data, which never left them; only adapter updates "
        f"travelled. This is {_state(info)}", "",
        *_results(info),
    ]
    if names:
        lines += ["## Labels", "", "| id | label |", "|---|---|", *[f"| {i} | {n} |" for i, n in enumerate(names)], ""]
    lines += [
        "## How it was trained", "",
        f"- Job: `{info.job.metadata.name}` ({spec.task.type}), {spec.training.rounds} rounds planned, "
        f"adapter version {info.version}.",
        f"- Trainer silos: {', '.join(trainers)}." + (f" Evaluator silos (score each version on held-out data, "
                                                      f"never train): {', '.join(evaluators)}." if evaluators else ""),
        f"- Aggregation: {agg.strategy}" + (f" ({params})" if params else "") + f", {agg.mode}, at least "
        f"{agg.min_silos} silo(s) per round, fraction {agg.fraction:g}.",
        f"- PEFT: {recipe}.",
        f"- Each silo, each round: {steps}, batch {t.batch_size}, learning rate {t.learning_rate:g}, "
        f"max length {t.max_length}, {t.precision}, seed {t.seed}.",
        f"- Privacy: {privacy_sentence(privacy(info.job, info.status))}", "",
        *_generations(info),
        *_loading(info),
        "## Provenance", "",
        f"- `adapter_model.safetensors`: sha256 `{info.sha256}`, byte for byte global version {info.version} "
        "as the aggregator serves it (its ETag).",
        f"- Saved {info.saved_at} by fedsilo {_version()}, " + (
            f"pulled from the aggregator at {info.source.get('url')}." if info.source.get("kind") == "pull"
            else "from a local run (`fedsilo run`)."),
        f"- `{METADATA}` in this folder holds the same facts for programs.", "",
    ]
    return "\n".join(lines)
