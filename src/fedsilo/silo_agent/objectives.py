"""Silo-side training objectives against label skew.

Logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment"; balanced
softmax, Ren et al. 2020; in federated learning FedLC, Zhang et al. 2022): the silo trains on
`logits + tau * log(prior)`, prior being its own label frequencies. The adjustment absorbs the
silo's label prior, so what the shared model learns is the class-conditional evidence, not
"this silo sees mostly class k". Evaluation and the exported model use the plain logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def log_prior(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """log of the label frequencies with add-one smoothing: a class the silo never saw stays finite."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    counts = torch.ones(n_classes, dtype=torch.float64)
    for label in labels:
        if not 0 <= int(label) < n_classes:
            raise ValueError(f"label id {label} outside [0, {n_classes})")
        counts[int(label)] += 1
    return (counts / counts.sum()).log().float()


def adjusted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor, tau: float
) -> torch.Tensor:
    """Cross-entropy of `logits + tau * prior` (prior: `log_prior`); tau 0 is plain cross-entropy."""
    if logits.shape[-1] != prior.shape[0]:
        raise ValueError(f"{logits.shape[-1]} logits per example, but a prior over {prior.shape[0]} classes")
    return F.cross_entropy(logits.float() + tau * prior.to(logits.device), labels)
