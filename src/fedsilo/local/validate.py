"""`fedsilo validate`: everything this machine can check about a job, every problem at once.

Beyond the spec itself (field by field), it opens what a local run would open:
- each silo's data file exists, parses in its format, holds the text and label columns
  (instruction/output or messages for a causal LM), and its labels are the job's classes
  (names or indices), reporting the unknown values and how many rows hold them;
- the base model folder exists (or the hub id is in the local cache) with a config, and
  `peft.targetModules` name modules that model has (built on the meta device: no weights).
What lives inside a silo — data on its volume, an external silo's files, a model path that
only exists in the silo pods — cannot be checked here, and the report says so by name.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedsilo.spec import BaseModelSpec, FederatedJob, PeftSpec, SiloSpec, SpecError, parse_job


@dataclass
class Report:
    """What `validate` found: problems (the job cannot run), what it checked, what it could not."""

    job: FederatedJob | None = None
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(job_file: Path) -> Report:
    """Check the spec, then the silos' data and the base model as far as this machine can see them."""
    report = Report()
    try:
        document = yaml.safe_load(job_file.read_text())
    except yaml.YAMLError as exc:
        report.problems.append(f"not valid YAML: {exc}")
        return report
    try:
        report.job = parse_job(document)
    except SpecError as exc:
        report.problems.extend(str(exc).splitlines())
    spec = (document or {}).get("spec") if isinstance(document, dict) else None
    if not isinstance(spec, dict):
        return report
    job_dir = job_file.resolve().parent
    task: dict[str, Any] = spec["task"] if isinstance(spec.get("task"), dict) else {}
    causal = task.get("type") == "causal-lm"
    labels = [str(x) for x in task.get("labels") or []] if not causal else []
    silos = [s for s in (_parse(SiloSpec, raw) for raw in spec.get("silos") or []) if s is not None]
    for silo in silos:
        _check_data(report, silo, job_dir, labels, causal)
    base = _parse(BaseModelSpec, spec.get("baseModel"))
    peft = _parse(PeftSpec, spec.get("peft") or {})
    if base is not None:
        local = any(_local(s) for s in silos) or not silos
        _check_model(report, base, peft, job_dir, causal, len(labels), local)
    if report.job is not None and report.job.spec.distillation is not None:
        _check_teacher(report, report.job.spec.distillation.teacher.path, job_dir, labels)
    return report


def _check_teacher(report: Report, path: str, job_dir: Path, labels: list[str]) -> None:
    """A FedKDLoRA teacher folder here: a classifier of exactly the job's labels (else say how to make one)."""
    import json

    where = "spec.distillation.teacher.path"
    folder = Path(path) if Path(path).is_absolute() else job_dir / path
    if not (folder / "config.json").is_file():
        report.unchecked.append(f"{where}: {path} is not a model folder here (make it with `fedsilo teacher`, "
                                "or it is mounted inside each silo)")
        return
    config = json.loads((folder / "config.json").read_text())
    names = [str(v) for _, v in sorted((int(k), v) for k, v in (config.get("id2label") or {}).items())]
    if names != labels:
        report.problems.append(f"{where}: the teacher predicts {names or 'no labels'}, the job's task.labels are "
                               f"{labels}: fine-tune it for them with `fedsilo teacher`")
        return
    report.checked.append(f"teacher {path}: a {_architecture(folder)} classifier of {', '.join(labels)}")


def _parse(model: Any, raw: Any) -> Any:
    """A spec part parsed on its own (its errors are already in the report), or None."""
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def _local(silo: SiloSpec) -> bool:
    """A silo whose files a local run reads from this machine (no volume, not external)."""
    return not silo.external and silo.volume is None


def _check_data(report: Report, silo: SiloSpec, job_dir: Path, labels: list[str], causal: bool) -> None:
    from fedsilo.silo_agent.data import DataError, read_table

    where = f"spec.silos[{silo.name}].data"
    if not _local(silo):
        inside = ("an external silo's own machine" if silo.external
                  else f"the silo's volume ({_volume(silo)}), mounted at /data")
        report.unchecked.append(f"{where}: {silo.data.path} is read inside the silo, from {inside}")
        return
    try:
        frame = read_table(silo.data, job_dir)
    except (DataError, ValueError) as exc:
        report.problems.append(f"{where}.path: {exc}")
        return
    path = silo.data.path
    if causal:
        chat = silo.data.messages_field in frame.columns
        needed = [silo.data.messages_field] if chat else [silo.data.instruction_field, silo.data.output_field]
    else:
        needed = [silo.data.text_field, silo.data.label_field] + (
            [silo.data.text_pair_field] if silo.data.text_pair_field else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        report.problems.append(f"{where}: {path} has no column {', '.join(map(repr, missing))} "
                               f"(columns: {', '.join(map(str, frame.columns))})")
        return
    usable = frame.dropna(subset=needed)
    if usable.empty:
        report.problems.append(f"{where}: every row of {path} has an empty {', '.join(needed)}")
        return
    summary = f"{len(usable)} rows"
    if len(usable) < len(frame):
        summary += f" ({len(frame) - len(usable)} with an empty {'/'.join(needed)} are skipped)"
    if labels:
        counts, bad = _label_counts(usable[silo.data.label_field], labels)
        if bad:
            shown = ", ".join(f"{value!r} ({n} rows)" for value, n in bad.most_common(5))
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            report.problems.append(f"{where}: column {silo.data.label_field!r} of {path} holds values that are not "
                                   f"task.labels {labels} nor their indices: {shown}{more}")
            return
        summary += ", " + ", ".join(f"{name} {counts[name]}" for name in labels)
    report.checked.append(f"silo {silo.name}: {path}: {summary}")


def _label_counts(values: Any, labels: list[str]) -> tuple[Counter[str], Counter[str]]:
    """Rows per class and rows per unknown value, mapped exactly as the silo agent maps them."""
    from fedsilo.silo_agent.data import DataError, label_ids

    counts: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    for value, n in values.value_counts(dropna=True).items():
        try:
            counts[labels[label_ids([value], labels, "")[0]]] += int(n)
        except DataError:
            bad[str(value)] += int(n)
    return counts, bad


def _volume(silo: SiloSpec) -> str:
    v = silo.volume
    assert v is not None
    if v.persistent_volume_claim:
        return f"PVC {v.persistent_volume_claim}"
    return f"hostPath {v.host_path}" if v.host_path else "emptyDir"


def _check_model(report: Report, base: BaseModelSpec, peft: PeftSpec | None, job_dir: Path, causal: bool,
                 n_labels: int, local: bool) -> None:
    where = "spec.baseModel.path"
    candidate = Path(base.path)
    folder = candidate if candidate.is_absolute() else job_dir / candidate
    if folder.is_dir():
        _check_folder(report, base, peft, folder, causal, n_labels)
        return
    if not local:
        report.unchecked.append(f"{where}: {base.path} is loaded inside each silo (not a folder on this machine)")
        return
    if candidate.is_absolute() or candidate.parts[0] in (".", ".."):
        report.problems.append(f"{where}: {base.path} is not a folder on this machine")
        return
    cached = _in_hub_cache(base)
    if cached is None:
        report.problems.append(
            f"{where}: {base.path} is neither a folder relative to the job file ({job_dir}) nor a hub id in the "
            "local Hugging Face cache; fedsilo never downloads: put the model folder there or cache it first")
        return
    _check_folder(report, base, peft, cached, causal, n_labels, name=base.path)


def _in_hub_cache(base: BaseModelSpec) -> Path | None:
    """The cached snapshot folder of hub id `base.path`, if config.json is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(base.path, "config.json", revision=base.revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _check_folder(report: Report, base: BaseModelSpec, peft: PeftSpec | None, folder: Path, causal: bool,
                  n_labels: int, name: str | None = None) -> None:
    where = "spec.baseModel"
    shown = name or base.path
    if base.gguf_file:
        if not (folder / base.gguf_file).is_file():
            report.problems.append(f"{where}.ggufFile: {base.gguf_file} is not in {folder}")
            return
        report.checked.append(f"base model {shown}: {base.gguf_file} present (GGUF: modules not checked here)")
        return
    if not (folder / "config.json").is_file():
        report.problems.append(f"{where}.path: {folder} has no config.json: not a Hugging Face model folder")
        return
    kind = _architecture(folder)
    if peft is None or peft.method == "prompt-tuning":
        report.checked.append(f"base model {shown}: a {kind} checkpoint")
        return
    try:
        names = _module_names(folder, causal, n_labels)
    except Exception as exc:  # transformers raises many types for a config it cannot build
        report.problems.append(f"{where}.path: {folder}: the model cannot be built from its config.json: {exc}")
        return
    unmatched = [t for t in peft.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, two_d in names.items() if two_d})
        report.problems.append(f"spec.peft.targetModules: {unmatched} match no module of {kind} "
                               f"(modules with a weight matrix: {', '.join(leaves[:16])})")
        return
    report.checked.append(f"base model {shown}: a {kind} checkpoint with targetModules "
                          f"{', '.join(peft.target_modules)}")


def _architecture(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown architecture"
    return ", ".join(config.get("architectures") or [config.get("model_type", "unknown architecture")])


def _module_names(folder: Path, causal: bool, n_labels: int) -> dict[str, bool]:
    """Module names -> whether it holds a 2-D weight: from the safetensors headers (no torch), else the meta model."""
    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file()
             else [folder / "model.safetensors"])
    if all(f.is_file() for f in files):
        names: dict[str, bool] = {}
        for f in files:
            for tensor, info in _safetensors_header(f).items():
                if tensor != "__metadata__":
                    module = tensor.rsplit(".", 1)[0]
                    names[module] = names.get(module, False) or len(info.get("shape", ())) == 2
        return names
    model = _meta_model(folder, causal, n_labels)
    return {n: type(m).__name__ == "Linear" for n, m in model.named_modules() if n}


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor names, dtypes, shapes (the weights are not read)."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        return dict(json.loads(fh.read(size)))


def _meta_model(folder: Path, causal: bool, n_labels: int) -> Any:
    """The model's module tree from its config alone, on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if not causal:
        config.num_labels = max(n_labels, 2)
    with torch.device("meta"):
        factory = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        return factory.from_config(config)
