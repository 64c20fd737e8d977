"""FedKDLoRA vs FedLoRA vs full-model FedAvg on Rotten Tomatoes, as the FedKD seed's experiments do.

- **FedAvg (full model)**: every MiniLM weight trains on the silos and travels every round.
- **FedLoRA**: LoRA r=8 on query/value + head, FedAvg of the adapters (fedsilo's default).
- **FedKDLoRA**: FedLoRA whose silos also distil a frozen teacher — all-mpnet-base-v2 (BERT-base
  size, its own tokenizer) first fine-tuned on a public share no silo holds (`fit_teacher`, what
  `fedsilo teacher` runs) — with loss = CE + alpha * T^2 * KL(teacher || student).

One process, one model per method, silos simulated one after another with fedsilo's own trainer
and strategy objects (see benchmarks/strategies.py). Prints test accuracy and loss per round,
bytes per silo per round and total runtime (teacher fine-tuning and scoring reported apart).

    python examples/prepare_models.py --mpnet      # once: the teacher's base (~400 MB)
    python benchmarks/fedkd_lora.py --threads 2    # defaults: 4 silos, alpha 0.5, 5 rounds x 63 steps
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fedsilo.adapters import State, to_bytes
from fedsilo.silo_agent.data import DataError, Encoded, classification_texts, read_table
from fedsilo.silo_agent.model import load_base
from fedsilo.silo_agent.teacher import fit_teacher, load_teacher, teacher_logits
from fedsilo.silo_agent.trainer import Trainer
from fedsilo.spec import DataSpec, DistillationSpec, TeacherSpec
from strategies import EMPTY, PREPARE, ROOT, Bench, Row, job_spec, labels_of, minilm_path, shares

MPNET = ROOT / "examples" / "data" / "models" / "all-mpnet-base-v2"
LA_SUFFIX = {"fedlora": "", "fedkdlora": "", "fedlora+la": " + logit adjustment", "fedkdlora+la": " + logit adjustment"}
METHODS = ("full", *LA_SUFFIX)


class FullTrainer(Trainer):
    """The silo trainer on a plain model: every floating-point weight is the 'adapter'."""

    def state(self) -> State:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def load(self, state: State) -> None:
        self.model.load_state_dict(state, strict=False)


def full_fedavg(args: argparse.Namespace, bench: Bench, silos: list[Encoded], test: Encoded) -> Row:
    """Example-weighted FedAvg of the whole model's weights."""
    base, tokenizer = load_base(bench.spec, minilm_path())
    torch.manual_seed(bench.training.seed)
    trainers = [FullTrainer(base, tokenizer, bench.training, d, EMPTY) for d in silos]
    tester = FullTrainer(base, tokenizer, bench.training, EMPTY, test)
    global_state = trainers[0].state()
    row = Row("FedAvg (full model)", f"{args.alpha:g}", [])
    started = time.perf_counter()
    for _ in range(args.rounds):
        total: dict[str, torch.Tensor] = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        weight = 0
        for trainer in trainers:
            trainer.load(global_state)
            trainer.train(args.steps)
            for k, v in trainer.state().items():
                total[k] += (v.double() - global_state[k].double()) * len(trainer.train_data)
            weight += len(trainer.train_data)
            row.bytes_up = len(to_bytes(global_state))
        global_state = {k: (global_state[k].double() + total[k] / weight).to(global_state[k].dtype) for k in total}
        tester.load(global_state)
        result = tester.evaluate()
        row.curve.append(result.accuracy or 0.0)
        row.losses.append(result.loss)
    row.seconds = time.perf_counter() - started
    return row


def scored(teacher: tuple[Any, Any], data: Encoded, frame: pd.DataFrame, max_length: int) -> Encoded:
    texts, pairs, _ = classification_texts(frame, DataSpec(path="silo.csv"))
    return Encoded(data.features, data.labels, teacher_logits(*teacher, texts, pairs, max_length))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=63)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--classes", nargs="+", default=None, choices=["fresh", "rotten", "plot"],
                        help="The task's classes (default rotten fresh); fresh rotten plot is the three-class task.")
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--public-examples", type=int, default=1000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (full model: --full-lr).")
    parser.add_argument("--full-lr", type=float, default=3e-5)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", type=Path, default=MPNET, help="Teacher base model folder.")
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--teacher-lr", type=float, default=3e-5)
    parser.add_argument("--kd-alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--methods", nargs="+", default=["full", "fedlora", "fedkdlora"], choices=list(METHODS),
                        help="NAME+la: the silos' logit-adjusted loss (training.logitAdjustment 1) as well.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fedkd_lora.md")
    args = parser.parse_args()
    if {"fedkdlora", "fedkdlora+la"} & set(args.methods) and not (args.teacher / "config.json").exists():
        raise SystemExit(f"no teacher base at {args.teacher}: python examples/prepare_models.py --mpnet")
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    spec = job_spec(argparse.Namespace(**{**vars(args), "silos": args.silos}), minilm_path())
    bench = Bench(args, spec, minilm_path())
    rows: list[Row] = []
    info: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-kd-") as tmp:
        out = Path(tmp)
        done = subprocess.run([sys.executable, str(PREPARE), "--out", str(out), "--silos", str(args.silos),
                               "--alpha", str(args.alpha), "--train-examples", str(args.train_examples),
                               "--public-examples", str(args.public_examples), "--test-examples",
                               str(args.test_examples), "--seed", str(args.seed), "--classes", *labels_of(args)],
                              check=True, capture_output=True, text=True)
        info.append("data: " + "; ".join(done.stdout.strip().splitlines()))
        frames, silos = [], []
        for i in range(args.silos):
            path = out / f"silo-{chr(ord('a') + i)}.csv"
            try:
                silos.append(bench.encode(path))
                frames.append(read_table(DataSpec(path=str(path)), out))
            except DataError:
                info.append(f"{path.name}: empty, skipped")
        test = bench.encode(out / "test.csv")
        bench.set_test(test)
        for method in ("fedlora", "fedlora+la"):
            if method in args.methods:
                rows.append(bench.federated(method.replace("fedlora", "fedavg"), {}, silos, f"{args.alpha:g}"))
                rows[-1].strategy = "FedLoRA (fedavg of LoRA r8)" + LA_SUFFIX[method]
        if {"fedkdlora", "fedkdlora+la"} & set(args.methods):
            started = time.perf_counter()
            public = read_table(DataSpec(path=str(out / "public.csv")), out)
            report = fit_teacher(str(args.teacher), public, DataSpec(path="public.csv"), labels_of(args),
                                 out / "teacher", steps=args.teacher_steps, batch_size=args.batch_size,
                                 learning_rate=args.teacher_lr, max_length=args.max_length, seed=args.seed)
            teacher = load_teacher(TeacherSpec(path=str(out / "teacher")), labels_of(args))
            test_frame = read_table(DataSpec(path=str(out / "test.csv")), out)
            texts, _, _ = classification_texts(test_frame, DataSpec(path="test.csv"))
            logits = torch.tensor(teacher_logits(*teacher, texts, None, args.max_length))
            teacher_acc = float((logits.argmax(-1) == torch.tensor(test.labels)).float().mean())
            fit_seconds = report.seconds
            soft_silos = [scored(teacher, d, f, args.max_length) for d, f in zip(silos, frames, strict=True)]
            prep = time.perf_counter() - started
            info.append(f"teacher: {args.teacher.name} fine-tuned {report.steps} steps on {report.public_examples} "
                        f"public snippets in {fit_seconds:.0f}s; test accuracy {teacher_acc:.3f}; scoring the "
                        f"silos' {sum(len(d) for d in silos)} examples: {prep - fit_seconds:.0f}s")
            distill = DistillationSpec(teacher=TeacherSpec(path="teacher"), temperature=args.temperature,
                                       alpha=args.kd_alpha)
            for method in ("fedkdlora", "fedkdlora+la"):
                if method in args.methods:
                    name = method.replace("fedkdlora", "fedavg")
                    rows.append(bench.federated(name, {}, soft_silos, f"{args.alpha:g}", distillation=distill))
                    rows[-1].strategy = f"FedKDLoRA (teacher {args.teacher.name})" + LA_SUFFIX[method]
                    rows[-1].notes.append(f"+{prep:.0f}s teacher fine-tuning and scoring, once")
        if "full" in args.methods:
            full_args = argparse.Namespace(**{**vars(args), "lr": args.full_lr})
            bench.training = bench.training.model_copy(update={"learning_rate": args.full_lr})
            rows.append(full_fedavg(full_args, bench, silos, test))
        info.append("silos: " + ", ".join(shares(d, labels_of(args)) for d in silos))
    lines = ["| method | final test acc | best acc | test loss per round | bytes up / silo / round | runtime s "
             "| notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.strategy} | {r.curve[-1]:.3f} | {max(r.curve):.3f} | "
                     f"{' '.join(f'{x:.3f}' for x in r.losses)} | {r.bytes_up or 0:,} | {r.seconds:.0f} | "
                     f"{'; '.join(r.notes)} |")
    curve = ["| method | test accuracy after round 1, 2, ... |", "|---|---|"]
    curve += [f"| {r.strategy} | {' '.join(f'{a:.3f}' for a in r.curve)} |" for r in rows]
    text = "\n".join([
        "# FedKDLoRA vs FedLoRA vs full-model FedAvg (benchmarks/fedkd_lora.py)", "",
        f"Command: `python benchmarks/fedkd_lora.py {' '.join(sys.argv[1:])}`".rstrip(), "",
        f"Settings: MiniLM-L6 student; {args.silos} silos, Dirichlet alpha {args.alpha:g}; {args.rounds} rounds x "
        f"{args.steps} local steps x batch {args.batch_size}; LoRA lr {args.lr:g}, full-model lr {args.full_lr:g}; "
        f"KD alpha {args.kd_alpha:g}, T {args.temperature:g}; max_length {args.max_length}; torch threads "
        f"{args.threads}.", "",
        *[f"- {line}" for line in info], "", *lines, "", *curve, "",
        f"Wall time: {(time.perf_counter() - wall) / 60:.1f} min.", "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
