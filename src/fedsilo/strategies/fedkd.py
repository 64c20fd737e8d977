"""FedKD (Wu et al., Nature Communications 2022): FedAvg on the server, mutual distillation on each silo.

Each silo keeps a private, larger teacher adapter next to the shared student adapter and
trains both every step, each distilling from the other's softened predictions. Only the
student travels and is averaged, so the bytes per round are those of FedAvg. The strategy
itself is FedAvg; it only tells silos the distillation settings.
"""

from __future__ import annotations

from typing import ClassVar

from fedsilo.strategies.base import ClientConfig
from fedsilo.strategies.fedavg import FedAvg


class FedKD(FedAvg):
    """FedAvg of the student adapter plus `distill_*` settings sent to silos."""

    name = "fedkd"
    defaults: ClassVar[dict[str, float]] = {"temperature": 2.0, "alpha": 0.5, "teacher_rank": 16}

    def check(self) -> None:
        self.require(self.params["temperature"] > 0, "temperature", "must be > 0")
        self.require(self.params["alpha"] >= 0, "alpha", "must be >= 0")
        rank = self.params["teacher_rank"]
        self.require(rank >= 1 and rank == int(rank), "teacher_rank", "must be a whole number >= 1")

    def client_config(self) -> ClientConfig:
        return {
            "distill_temperature": self.params["temperature"],
            "distill_alpha": self.params["alpha"],
            "teacher_rank": self.params["teacher_rank"],
        }
