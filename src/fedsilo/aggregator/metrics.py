"""Prometheus metrics of the aggregator (one registry per app, so tests can run several).

Naming follows Prometheus conventions: `fedsilo_` prefix, base units as suffixes,
`_total` on counters. Every series carries the `job` label (the FederatedJob name);
note Prometheus renames a scraped `job` label to `exported_job` unless
`honor_labels` is set, which the dashboards and ServiceMonitor account for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
_AGG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    per_silo: bool = True  # series labelled by silo (loss, accuracy, examples, train time); off: none are kept

    def __post_init__(self) -> None:
        r = self.registry
        self.round = Gauge("fedsilo_round", "Current (latest opened) round of the job", ["job"], registry=r)
        self.rounds_total_planned = Gauge("fedsilo_rounds_planned", "Rounds the job will run", ["job"], registry=r)
        self.global_accuracy = Gauge(
            "fedsilo_global_accuracy_ratio",
            "Accuracy of the latest evaluated global adapter",
            ["job", "split"],
            registry=r,
        )
        self.global_loss = Gauge(
            "fedsilo_global_loss", "Loss of the latest evaluated global adapter", ["job", "split"], registry=r
        )
        self.silo_accuracy = Gauge(
            "fedsilo_silo_accuracy_ratio",
            "A silo's accuracy of the latest global adapter",
            ["job", "silo", "split"],
            registry=r,
        )
        self.silo_loss = Gauge(
            "fedsilo_silo_loss", "A silo's loss of the latest global adapter", ["job", "silo", "split"], registry=r
        )
        self.silo_examples = Gauge(
            "fedsilo_silo_examples", "Examples in a silo's latest update", ["job", "silo"], registry=r
        )
        self.silo_train_seconds = Gauge(
            "fedsilo_silo_train_seconds",
            "A silo's local training time in its latest round",
            ["job", "silo"],
            registry=r,
        )
        self.round_duration = Histogram(
            "fedsilo_round_duration_seconds",
            "Wall time from round open to new global adapter",
            ["job"],
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.aggregation_duration = Histogram(
            "fedsilo_aggregation_duration_seconds",
            "Time to turn the accumulator into the next global adapter",
            ["job"],
            buckets=_AGG_BUCKETS,
            registry=r,
        )
        self.received_bytes = Counter(
            "fedsilo_received_bytes_total", "Update bytes received from silos", ["job"], registry=r
        )
        self.sent_bytes = Counter("fedsilo_sent_bytes_total", "Adapter bytes sent to silos", ["job"], registry=r)
        self.updates_accepted = Counter(
            "fedsilo_updates_accepted_total", "Updates folded into a round", ["job"], registry=r
        )
        self.updates_rejected = Counter(
            "fedsilo_updates_rejected_total", "Updates refused, by reason", ["job", "reason"], registry=r
        )
        self.silos_joined = Gauge("fedsilo_silos_joined", "Silos that have joined the job", ["job"], registry=r)
        self.silos_participating = Gauge(
            "fedsilo_silos_participating", "Silos sampled for the current round", ["job"], registry=r
        )
        self.long_polls_waiting = Gauge(
            "fedsilo_long_polls_waiting", "Requests held open waiting for the job to change", ["job"], registry=r
        )
        self.privacy_epsilon = Gauge(
            "fedsilo_privacy_epsilon",
            "Differential-privacy budget spent so far (epsilon at the job's delta)",
            ["job"],
            registry=r,
        )
        self.lora_truncation_error = Gauge(
            "fedsilo_lora_truncation_error_ratio",
            "Relative error of re-factorising the exact LoRA product",
            ["job"],
            registry=r,
        )
