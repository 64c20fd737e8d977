"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): clip, noise, account.

Every silo's update is scaled to L2 norm at most C, updates are summed with equal weight
(one silo changes the sum by at most C: the sensitivity), and the sum gets Gaussian noise
of standard deviation sigma * C. With secure aggregation nobody may see the noise-free sum,
so each silo adds its share: noise of variance (sigma * C)^2 / t, where t is the fewest
silos a round can close with (the secure threshold); any t or more surviving shares add up
to at least the full variance. Epsilon comes from Opacus' accountants (RDP or PRV), over
the rounds closed so far, each with its noise multiplier and sampling rate.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Mapping, Sequence

import torch

from fedsilo.adapters import State, l2_norm

Round = tuple[float, float]  # (noise multiplier, sampling rate) of one closed round


def clip(update: Mapping[str, torch.Tensor], clip_norm: float) -> State:
    """`update` scaled to L2 norm at most `clip_norm` (over all its tensors), in float32."""
    norm = l2_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.float() * factor for k, v in update.items()}


def gaussian(like: Mapping[str, torch.Tensor], std: float) -> State:
    """Fresh Gaussian noise shaped like `like` (float64), from the OS's entropy: never replayable."""
    if std == 0:
        return {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()}
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    return {k: torch.randn(v.shape, dtype=torch.float64, generator=generator) * std for k, v in like.items()}


def central_std(noise_multiplier: float, clip_norm: float) -> float:
    """Noise on the round's sum when the aggregator adds it."""
    return noise_multiplier * clip_norm


def share_std(noise_multiplier: float, clip_norm: float, threshold: int) -> float:
    """Each silo's share under secure aggregation: any `threshold` shares sum to the full variance."""
    return noise_multiplier * clip_norm / math.sqrt(threshold)


def epsilon(history: Sequence[Round], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` spent by the closed rounds in `history`; inf without noise; 0 before any round."""
    rounds = [(sigma, q) for sigma, q in history if q > 0]
    if not rounds:
        return 0.0
    if any(sigma <= 0 for sigma, _ in rounds):
        return math.inf
    # imported here, not at module level: importing opacus calls logging.basicConfig, which would
    # otherwise come before (and disable) the aggregator's and the silo agent's own logging setup
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = _compressed(rounds)
    with warnings.catch_warnings():  # PRV's log(0) at q = 1 is handled inside Opacus
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta))


def _compressed(rounds: Sequence[Round]) -> list[tuple[float, float, int]]:
    """Consecutive identical rounds as one (sigma, q, steps) entry, as Opacus keeps its history."""
    out: list[tuple[float, float, int]] = []
    for sigma, q in rounds:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + 1)
        else:
            out.append((sigma, q, 1))
    return out
