"""Silo-side training objectives against label skew.

Logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment"; balanced
softmax, Ren et al. 2020; in federated learning FedLC, Zhang et al. 2022): the silo trains on
`logits + tau * (log(own prior) - log(reference prior))`. The adjustment absorbs the silo's own
label prior and puts the reference one in its place, so what the shared model learns is not
"this silo sees mostly class k". The reference is the federation's label prior (the silos'
summed counts) where the aggregator may collect them, else uniform. Evaluation and the
exported model use the plain logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def label_counts(labels: Sequence[int], n_classes: int) -> list[int]:
    """Examples per class id; an id outside [0, n_classes) is refused."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    counts = [0] * n_classes
    for label in labels:
        if not 0 <= int(label) < n_classes:
            raise ValueError(f"label id {label} outside [0, {n_classes})")
        counts[int(label)] += 1
    return counts


def log_prior_of(counts: Sequence[int]) -> torch.Tensor:
    """log of the label frequencies with add-one smoothing: a class nobody saw stays finite."""
    smoothed = torch.tensor(counts, dtype=torch.float64) + 1
    return (smoothed / smoothed.sum()).log().float()


def log_prior(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    return log_prior_of(label_counts(labels, n_classes))


def adjustment(own: Sequence[int], federation: Sequence[int] | None) -> torch.Tensor:
    """What the silo adds to its logits (times tau): log(own prior) - log(federation prior).

    The model then learns the federation's p(y|x), as if the silos' data were pooled, whatever
    this silo's own label mix: on IID silos the adjustment is zero up to the add-one smoothing
    (FedAvg). Without the
    federation's counts (secure aggregation, DP) the reference is the uniform prior: a balanced
    classifier."""
    if federation is None:
        return log_prior_of(own)
    if len(federation) != len(own):
        raise ValueError(f"federation label counts over {len(federation)} classes, this silo's over {len(own)}")
    return log_prior_of(own) - log_prior_of(federation)


def adjusted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor, tau: float
) -> torch.Tensor:
    """Cross-entropy of `logits + tau * prior` (prior: `adjustment`); tau 0 is plain cross-entropy."""
    if logits.shape[-1] != prior.shape[0]:
        raise ValueError(f"{logits.shape[-1]} logits per example, but a prior over {prior.shape[0]} classes")
    return F.cross_entropy(logits.float() + tau * prior.to(logits.device), labels)
