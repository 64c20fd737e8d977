"""The silo agent loop: join, then do whatever task the aggregator hands out until done.

The agent gives up on its own only for configuration errors (a 4xx that says the request
is wrong, bad data, a missing model): outages are retried for as long as they last, a
late upload skips to the next task, and a restarted agent resumes where the aggregator is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import httpx
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from fedsilo.adapters import delta, from_bytes, to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client, ClientError, Outcome, Upload
from fedsilo.silo_agent import hardware
from fedsilo.silo_agent.causal_lm import CausalLMTrainer, encode_causal_lm, generation_prompts
from fedsilo.silo_agent.data import DataError, Encoded, encode_classification, read_table, split_indices
from fedsilo.silo_agent.distill import DistillConfig, Distiller
from fedsilo.silo_agent.model import ModelError, load_base, peft_config, wrap
from fedsilo.silo_agent.quiet import setup_logging
from fedsilo.silo_agent.secure import SecureRound, SitOut
from fedsilo.silo_agent.settings import SiloSettings
from fedsilo.silo_agent.teacher import silo_soft_targets
from fedsilo.silo_agent.trainer import Trainer, TrainResult
from fedsilo.silo_agent.uplink import Uplink
from fedsilo.spec import CodecSpec, FederatedJob, SiloSpec
from fedsilo.strategies import is_lora_a, normalise_steps, pad_rank, proximal_term, truncate_rank

log = logging.getLogger("fedsilo.silo")
OWED_WAIT = 1.0  # seconds a silo with validations owed waits for a next round before validating


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.round = Gauge("fedsilo_silo_agent_round", "Round this silo last trained", registry=r)
        self.train_seconds = Gauge(
            "fedsilo_silo_agent_train_seconds", "Local training time of the last round", registry=r
        )
        self.train_loss = Gauge("fedsilo_silo_agent_train_loss", "Mean training loss of the last round", registry=r)
        self.examples = Counter("fedsilo_silo_agent_examples_total", "Training examples processed", registry=r)
        self.bytes_sent = Counter("fedsilo_silo_agent_bytes_sent_total", "Update bytes uploaded", registry=r)
        self.eval_loss = Gauge("fedsilo_silo_agent_eval_loss", "Loss of the latest global adapter here", registry=r)


def build_trainer(job: FederatedJob, silo: SiloSpec, settings: SiloSettings) -> Trainer:
    """Load model, adapter recipe and this silo's data once for the whole job."""
    spec = job.spec
    model_path = settings.model_path or spec.base_model.path
    cuda = torch.cuda.is_available()
    hardware.check_device(spec.training, cuda)
    frame = read_table(silo.data, settings.data_root)
    model, tokenizer = load_base(spec, model_path, cuda)
    model = wrap(model, peft_config(spec, model_path, silo.rank), spec.training.seed)
    model = hardware.autocast_forward(model, spec.training, cuda)
    causal = spec.task.type == "causal-lm"
    encoded: Encoded = (
        encode_causal_lm(frame, silo.data, tokenizer, spec.training.max_length)
        if causal
        else encode_classification(frame, silo.data, spec.task.labels, tokenizer, spec.training.max_length)
    )
    if silo.role == "evaluator":
        train_idx: list[int] = []
        eval_idx = list(range(len(encoded)))
    else:
        train_idx, eval_idx = split_indices(len(encoded), silo.data.validation_split, spec.training.seed)
    log.info("memory estimate on %s: %s", hardware.device(cuda), hardware.estimate_for(model, spec.training).describe())
    train, evaluation = encoded.subset(train_idx), encoded.subset(eval_idx)
    if causal:
        return CausalLMTrainer(
            model,
            tokenizer,
            spec.training,
            train,
            evaluation,
            prompts=generation_prompts(spec, silo),
            max_new_tokens=spec.task.max_new_tokens,
        )
    if spec.distillation is not None and train_idx:  # FedKDLoRA: the frozen teacher scores our examples once
        soft = silo_soft_targets(spec, frame, silo.data, settings.data_root)
        train = Encoded(train.features, train.labels, [soft[i] for i in train_idx])
    training = spec.training.model_copy(update={"logit_adjustment": spec.logit_adjustment()})
    return Trainer(model, tokenizer, training, train, evaluation, distillation=spec.distillation)


class Agent:
    def __init__(
        self,
        client: Client,
        trainer: Trainer,
        silo: SiloSpec,
        settings: SiloSettings,
        metrics: AgentMetrics,
        global_rank: int,
        codec: CodecSpec | None = None,
    ) -> None:
        self.client, self.trainer, self.silo, self.settings, self.metrics = client, trainer, silo, settings, metrics
        self.loaded_version: int | None = None
        self.global_state: dict[str, torch.Tensor] = {}
        self.evaluated: set[int] = set()
        self.owed: list[int] = []  # versions to validate when idle
        self.split: Literal["validation", "test"] = "test" if silo.role == "evaluator" else "validation"
        self.global_rank = global_rank
        self.rank = silo.rank if silo.rank not in (None, global_rank) else None
        self.distiller: Distiller | None = None  # FedKD's private teacher, kept across rounds
        self.resuming = True  # until the first task: a restarted agent may owe an evaluation
        owner = f"{settings.job}/{silo.name}"
        self.uplink = Uplink(codec or CodecSpec(), owner, settings.state_dir)  # the codec in force for this silo

    def join(self) -> m.JoinResponse:
        """Join the job (again after a restart: the aggregator keeps what this silo already sent)."""
        return self.client.join(
            m.JoinRequest(n_train_examples=len(self.trainer.train_data), n_eval_examples=len(self.trainer.eval_data))
        )

    def _load_version(self, version: int) -> None:
        if self.loaded_version != version:
            self.global_state = from_bytes(self.client.adapter(version))
            self.loaded_version = version
        # also after training moved the weights: restore the global ones
        local = truncate_rank(self.global_state, self.rank) if self.rank is not None else self.global_state
        self.trainer.load(local)

    def evaluate(self, version: int) -> None:
        if version in self.evaluated or not len(self.trainer.eval_data):
            return
        self._load_version(version)
        result = self.trainer.evaluate()
        self.client.post_metrics(
            m.MetricsReport(
                version=version,
                split=self.split,
                loss=result.loss,  # type: ignore[arg-type]
                accuracy=result.accuracy,
                n_examples=result.n_examples,
                extra={"eval_seconds": result.seconds, **result.extra},
                generations=result.generations,
            )
        )
        self.evaluated.add(version)
        self.metrics.eval_loss.set(result.loss)
        acc = f"{result.accuracy:.4f}" if result.accuracy is not None else "-"
        log.info(
            "version %d on %s: loss %.4f accuracy %s (%d examples, %.1fs)",
            version,
            self.split,
            result.loss,
            acc,
            result.n_examples,
            result.seconds,
        )
        for prompt, text in result.generations.items():
            log.info("version %d generation: %r -> %r", version, prompt, text)

    def train(self, task: m.Task) -> None:
        self._load_version(task.version)
        if task.secure:
            self._train_secure(task)
        else:
            local, result = self._train_delta(task)
            data = self.uplink.encode(task.round, local, task.client_config)
            upload = self.client.put_update(
                task.round, data, len(self.trainer.train_data), result.seconds, result.examples_seen
            )
            if upload.outcome is not Outcome.LATE:  # an update not counted leaves the residual as it was
                self.uplink.commit()
            self._report(task, result, len(data), upload)
        # Validate the adapter this round started from when there is nothing else to do: the
        # next round's training comes first, so validation is never on a round's critical path.
        self.owed.append(task.version)

    def _train_delta(self, task: m.Task) -> tuple[dict[str, torch.Tensor], TrainResult]:
        """Train round `task.round` locally; the delta to the global adapter, in the global shape."""
        if self.distiller is None and "distill_alpha" in task.client_config:
            config = DistillConfig.from_client_config(task.client_config)
            self.distiller = Distiller(self.trainer.model, config, self.trainer.training)
            log.info("fedkd: private teacher adapter of rank %d created (never uploaded)", config.teacher_rank)
        step_fn = self.distiller.step if self.distiller is not None else None
        result = self.trainer.train(
            task.local_steps,
            extra_loss=self._strategy_hooks(task),
            step_fn=step_fn,
            round_=task.round,  # with silo and the starting adapter: a retrained round is bit-identical
            silo=self.silo.name,
        )
        trained = self.trainer.state()
        if self.rank is not None:  # back to the global shape; frozen A rows come from the global adapter
            trained = pad_rank(trained, self.global_rank, a_from=self.global_state)
        # balanceWorkload gave this silo its own step count: send the delta of the job's localSteps
        update = normalise_steps(delta(trained, self.global_state), result.steps, self.trainer.training.local_steps)
        return update, result

    def _train_secure(self, task: m.Task) -> None:
        """One secure round: keys, shares, local training, the masked upload, the reveal.

        Private keys live only in this process: an agent restarted mid-round sits it out
        (the threshold covers it) and joins the next round.
        """
        try:
            secure = SecureRound(self.client, self.silo.name, task.round)
            secure.exchange_keys()
            local, result = self._train_delta(task)
            n = len(self.trainer.train_data)
            data = secure.masked(local, task, n)
            upload = self.client.put_update(task.round, data, n, result.seconds, result.examples_seen)
            self._report(task, result, len(data), upload)
            if upload.outcome is not Outcome.LATE:
                secure.reveal()
        except SitOut as exc:
            log.warning("round %d: sitting this secure round out (%s)", task.round, exc)

    def _report(self, task: m.Task, result: TrainResult, n_bytes: int, upload: Upload) -> None:
        if upload.outcome is Outcome.LATE:
            log.warning("round %d: update not counted, the round moved on (%s)", task.round, upload.detail)
        elif upload.outcome is Outcome.DUPLICATE and upload.detail:  # a different update of ours is counted
            log.warning("round %d: the aggregator already holds an update of ours (%s)", task.round, upload.detail)
        self.metrics.round.set(task.round)
        self.metrics.train_seconds.set(result.seconds)
        self.metrics.train_loss.set(result.loss)
        self.metrics.examples.inc(result.examples_seen)
        self.metrics.bytes_sent.inc(n_bytes)
        log.info(
            "round %d: %d steps, loss %.4f, %.1fs training, %d bytes up%s%s",
            task.round,
            result.steps,
            result.loss,
            result.seconds,
            n_bytes,
            " masked" if task.secure else "",
            "" if upload.outcome is Outcome.ACCEPTED else f" ({upload.outcome.value})",
        )

    def _strategy_hooks(self, task: m.Task) -> Callable[[Any], torch.Tensor] | None:
        """Apply the strategy's client config: freeze LoRA A (ffa-lora), add FedProx's proximal term."""
        config = task.client_config
        if config.get("freeze_lora_a"):
            for name, param in self.trainer.model.named_parameters():
                if is_lora_a(name):
                    param.requires_grad_(False)
        mu = float(config.get("proximal_mu", 0.0))
        if mu <= 0:
            return None
        anchor = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters() if p.requires_grad}

        def proximal(model: Any) -> torch.Tensor:
            live = {n: p for n, p in model.named_parameters() if p.requires_grad}
            return proximal_term(live, anchor, mu)

        return proximal

    def run(self) -> int:
        """Ask for tasks and do them until the job is done; returns the exit code."""
        while True:
            asked = time.monotonic()
            try:
                # with validations owed, wait only briefly: a round that is closing right now
                # (our upload may have been the last) hands out the next training first
                idle_wait = 0 if self.resuming else OWED_WAIT if self.owed else self.settings.long_poll_seconds
                task = self.client.task(wait=idle_wait)
                if self.resuming:
                    self.resuming = False
                    self._resume(task)
                if task.action in ("done", "wait") and self.owed:  # idle: validate what training skipped
                    self.evaluate(self.owed.pop(0))
                    continue
                if task.action == "done":
                    log.info("job finished at version %d", task.version)
                    return 0
                if task.action == "wait":
                    time.sleep(max(0.0, self.settings.poll_seconds - (time.monotonic() - asked)))
                elif task.action == "init":
                    digest = self.client.put_initial(to_bytes(self.trainer.state()))
                    log.info("initial adapter %s uploaded", digest[:12])
                elif task.action == "evaluate":
                    self.evaluate(task.version)
                elif task.action == "train":
                    self.train(task)
            except ClientError as exc:
                if exc.status != 409:
                    raise  # the request is wrong: configuration, not weather
                log.warning("the aggregator moved on (%s): asking for the next task", exc)
                if exc.reason == "not_joined":
                    self.join()
                time.sleep(self.settings.poll_seconds)

    def _resume(self, task: m.Task) -> None:
        """After a restart: if the open round already holds our update, do what followed that upload.

        The aggregator answers `wait` for such a round (nothing is retrained); the evaluation of
        the version the round started from may have been lost with the old process.
        """
        if task.action != "wait" or task.round < 1 or self.silo.role != "trainer":
            return
        current = next((r for r in self.client.rounds() if r.round == task.round), None)
        if current is not None and current.state == "open" and self.silo.name in current.participants:
            log.info("resumed: round %d already holds this silo's update, nothing to retrain", task.round)
            self.evaluate(task.round - 1)


def run_agent(settings: SiloSettings) -> int:
    """Entry point of `fedsilo silo-agent`; returns the process exit code."""
    setup_logging(settings.silo)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    metrics = AgentMetrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    client = Client(
        settings.aggregator_url,
        settings.job,
        settings.read_token(),
        settings.silo,
        token_source=settings.read_token if settings.token_file else None,
        retries=settings.request_retries,
        ca_bundle=settings.ca_bundle,
        client_cert=settings.client_cert_pair(),
        backoff_cap=settings.backoff_cap_seconds,
    )
    try:
        job = client.spec()
        silo = job.spec.silo(settings.silo)
        trainer = build_trainer(job, silo, settings)
        agent = Agent(client, trainer, silo, settings, metrics, job.spec.peft.r, job.spec.codec_for(silo.name))
        joined = agent.join()
        log.info(
            "joined job %s as %s: %d train / %d %s examples",
            settings.job,
            joined.role,
            len(trainer.train_data),
            len(trainer.eval_data),
            "test" if silo.role == "evaluator" else "validation",
        )
        return agent.run()
    except (DataError, ModelError, hardware.HardwareError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    except ClientError as exc:
        log.error("aggregator refused: %s; retrying cannot help, check this silo's configuration", exc)
        return 3
    except httpx.TransportError as exc:  # only with a bounded FEDSILO_REQUEST_RETRIES
        log.error("aggregator unreachable after %s retries: %s", settings.request_retries, exc)
        return 4
    finally:
        client.close()
