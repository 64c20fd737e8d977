"""The silo agent loop: join, then do whatever task the aggregator hands out until done."""

from __future__ import annotations

import logging
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from fedsilo.adapters import delta, from_bytes, to_bytes
from fedsilo.api import models as m
from fedsilo.api.client import Client, ClientError
from fedsilo.silo_agent.data import DataError, encode_classification, read_table, split_indices
from fedsilo.silo_agent.model import ModelError, load_base, peft_config, wrap
from fedsilo.silo_agent.settings import SiloSettings
from fedsilo.silo_agent.trainer import Trainer
from fedsilo.spec import FederatedJob, SiloSpec

log = logging.getLogger("fedsilo.silo")


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.round = Gauge("fedsilo_silo_agent_round", "Round this silo last trained", registry=r)
        self.train_seconds = Gauge("fedsilo_silo_agent_train_seconds", "Local training time of the last round", registry=r)
        self.train_loss = Gauge("fedsilo_silo_agent_train_loss", "Mean training loss of the last round", registry=r)
        self.examples = Counter("fedsilo_silo_agent_examples_total", "Training examples processed", registry=r)
        self.bytes_sent = Counter("fedsilo_silo_agent_bytes_sent_total", "Update bytes uploaded", registry=r)
        self.eval_loss = Gauge("fedsilo_silo_agent_eval_loss", "Loss of the latest global adapter here", registry=r)


def build_trainer(job: FederatedJob, silo: SiloSpec, settings: SiloSettings) -> Trainer:
    """Load model, adapter recipe and this silo's data once for the whole job."""
    spec = job.spec
    model_path = settings.model_path or spec.base_model.path
    frame = read_table(silo.data, settings.data_root)
    model, tokenizer = load_base(spec, model_path)
    model = wrap(model, peft_config(spec, model_path, silo.rank), spec.training.seed)
    encoded = encode_classification(frame, silo.data, spec.task.labels, tokenizer, spec.training.max_length)
    if silo.role == "evaluator":
        train_idx, eval_idx = [], list(range(len(encoded)))
    else:
        train_idx, eval_idx = split_indices(len(encoded), silo.data.validation_split, spec.training.seed)
    return Trainer(model, tokenizer, spec.training, encoded.subset(train_idx), encoded.subset(eval_idx))


class Agent:
    def __init__(self, client: Client, trainer: Trainer, silo: SiloSpec, settings: SiloSettings,
                 metrics: AgentMetrics) -> None:
        self.client, self.trainer, self.silo, self.settings, self.metrics = client, trainer, silo, settings, metrics
        self.loaded_version: int | None = None
        self.global_state: dict[str, torch.Tensor] = {}
        self.evaluated: set[int] = set()
        self.split = "test" if silo.role == "evaluator" else "validation"

    def _load_version(self, version: int) -> None:
        if self.loaded_version == version:
            self.trainer.load(self.global_state)  # training moved the weights: restore the global ones
            return
        data = self.client.adapter(version)
        self.global_state = from_bytes(data)
        self.trainer.load(self.global_state)
        self.loaded_version = version

    def evaluate(self, version: int) -> None:
        if version in self.evaluated or not len(self.trainer.eval_data):
            return
        self._load_version(version)
        result = self.trainer.evaluate()
        self.client.post_metrics(m.MetricsReport(version=version, split=self.split, loss=result.loss,  # type: ignore[arg-type]
                                                 accuracy=result.accuracy, n_examples=result.n_examples,
                                                 extra={"eval_seconds": result.seconds}))
        self.evaluated.add(version)
        self.metrics.eval_loss.set(result.loss)
        acc = f"{result.accuracy:.4f}" if result.accuracy is not None else "-"
        log.info("version %d on %s: loss %.4f accuracy %s (%d examples, %.1fs)", version, self.split,
                 result.loss, acc, result.n_examples, result.seconds)

    def train(self, task: m.Task) -> None:
        self.evaluate(task.version)  # the global adapter this round starts from
        self._load_version(task.version)
        result = self.trainer.train(task.local_steps)
        update = delta(self.trainer.state(), self.global_state)
        data = to_bytes(update)
        accepted = self.client.put_update(task.round, data, len(self.trainer.train_data), result.seconds)
        self.metrics.round.set(task.round)
        self.metrics.train_seconds.set(result.seconds)
        self.metrics.train_loss.set(result.loss)
        self.metrics.examples.inc(result.examples_seen)
        self.metrics.bytes_sent.inc(len(data))
        log.info("round %d: %d steps, loss %.4f, %.1fs training, %d bytes up%s", task.round, result.steps,
                 result.loss, result.seconds, len(data), " (duplicate)" if accepted.duplicate else "")

    def run(self) -> int:
        while True:
            task = self.client.task()
            if task.action == "done":
                log.info("job finished at version %d", task.version)
                return 0
            if task.action == "wait":
                time.sleep(self.settings.poll_seconds)
            elif task.action == "init":
                digest = self.client.put_initial(to_bytes(self.trainer.state()))
                log.info("initial adapter %s uploaded", digest[:12])
            elif task.action == "evaluate":
                self.evaluate(task.version)
            elif task.action == "train":
                self.train(task)


def run_agent(settings: SiloSettings) -> int:
    """Entry point of `fedsilo silo-agent`; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s silo {settings.silo} %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    metrics = AgentMetrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    client = Client(settings.aggregator_url, settings.job, settings.token, settings.silo,
                    retries=settings.request_retries, ca_bundle=settings.ca_bundle)
    try:
        job = client.spec()
        silo = job.spec.silo(settings.silo)
        trainer = build_trainer(job, silo, settings)
        joined = client.join(m.JoinRequest(n_train_examples=len(trainer.train_data),
                                           n_eval_examples=len(trainer.eval_data)))
        log.info("joined job %s as %s: %d train / %d %s examples", settings.job, joined.role,
                 len(trainer.train_data), len(trainer.eval_data), "test" if silo.role == "evaluator" else "validation")
        return Agent(client, trainer, silo, settings, metrics).run()
    except (DataError, ModelError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    except ClientError as exc:
        log.error("aggregator refused: %s", exc)
        return 3
    finally:
        client.close()
