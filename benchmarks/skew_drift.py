"""One local round per silo, alone: how far a one-class silo moves the shared model (issue 12).

Reproduces the mechanism behind the three-class, alpha 0.1 row of the label-skew table: under the
logit adjustment a one-class silo's training loss is near zero, yet AdamW normalises its steps,
so its update is as large as under plain cross-entropy and its local model predicts its own
class for everything. Per silo and tau: mean training loss, the update's L2 norm, and the local
model's predicted classes on the test set (the same data as `strategies.py --seed S --alphas A`).

    python benchmarks/skew_drift.py --seed 0 --alpha 0.1 --classes fresh rotten plot
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import torch

from fedsilo.adapters import State, delta
from strategies import Bench, job_spec, minilm_path, prepare_data, shares  # benchmarks/ is on the path


def predicted(bench: Bench, state: State, n_classes: int) -> list[int]:
    """How many test examples the adapter `state` assigns to each class."""
    assert bench.tester is not None
    bench.tester.load(state)
    model = bench.tester.model.eval()
    counts: collections.Counter[int] = collections.Counter()
    with torch.no_grad():
        for batch in bench.tester._eval_batches:  # the tester's own padded test batches
            counts.update(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1).tolist())
    return [counts.get(c, 0) for c in range(n_classes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--classes", nargs="+", default=["fresh", "rotten", "plot"],
                        choices=["fresh", "rotten", "plot"])
    parser.add_argument("--steps", type=int, default=63)
    parser.add_argument("--threads", type=int, default=2)
    cli = parser.parse_args()
    args = argparse.Namespace(rounds=1, steps=cli.steps, batch_size=16, lr=1e-3, max_length=48, seed=cli.seed, rank=8,
                              silos=4, train_examples=4000, test_examples=1000, classes=cli.classes)
    torch.set_num_threads(cli.threads)
    bench = Bench(args, job_spec(args, minilm_path()), minilm_path())
    with tempfile.TemporaryDirectory() as tmp:
        silos = [bench.encode(f) for f in prepare_data(args, cli.alpha, Path(tmp))]
        bench.set_test(bench.encode(Path(tmp) / "test.csv"))
    k = len(bench.labels)
    names = " / ".join(bench.labels)
    print(f"| tau | silo | mean training loss | update L2 norm | predicted {names} on the test set |")
    print("|---|---|---|---|---|")
    for tau in (1.0, 0.0):
        for data in silos:
            torch.manual_seed(cli.seed)
            trainer = bench.silo_trainer(data, tau)
            trainer.load(dict(bench.initial))
            result = trainer.train(cli.steps)
            state = trainer.state()
            norm = sum(float(v.double().norm() ** 2) for v in delta(state, bench.initial).values()) ** 0.5
            counts = " / ".join(map(str, predicted(bench, state, k)))
            print(f"| {tau:g} | {shares(data, bench.labels)} | {result.loss:.4f} | {norm:.2f} | {counts} |", flush=True)


if __name__ == "__main__":
    main()
