"""Heterogeneous LoRA ranks: a weak silo trains rank r_i < r (HetLoRA-style).

Convention (tested): a silo with rank r_i configures peft with
`lora_alpha = silo_alpha(alpha, r, r_i)` so that its scale equals the global scale
alpha / r (alpha * sqrt(r_i) / sqrt(r) with rsLoRA, whose scale is alpha / sqrt(r)).
Then zero-padding its factors to rank r changes nothing: scale * B_pad @ A_pad equals the
silo's own scale_i * B_i @ A_i, and every aggregation sees one scale.

Silo-side sequence each round:
    local = truncate_rank(global_state, r_i)        # start from the top r_i components
    ... train the rank-r_i adapter (lora_alpha = silo_alpha(alpha, r, r_i)) ...
    delta = adapters.delta(pad_rank(trained, r), global_state)
    # ffa-lora: pad_rank(trained, r, a_from=global_state), so A's delta stays zero
After `lora-exact` the global factors are SVD-ordered, so truncation keeps the dominant
directions of the global update.

Weighted sums: a rank-r_i silo's padded components j >= r_i are zeros it never trained, not
updates towards zero. `rescale_components` divides each component's sum by the weight of
the silos that trained it (HetLoRA-style rank-aware averaging), so fedavg and every other
weighted-sum strategy average component j over exactly the silos of rank > j and no longer
shrink the higher components every round. lora-exact needs no correction (a padded pair's
product is the silo's own product).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from fedsilo.adapters import State
from fedsilo.strategies.lora import LORA_A, LORA_B, check_pair, lora_pairs


def silo_alpha(alpha: float, r_global: int, r_silo: int, rslora: bool = False) -> float:
    """lora_alpha for a rank-`r_silo` silo so that its scale equals the global scale."""
    if not 1 <= r_silo <= r_global:
        raise ValueError(f"silo rank {r_silo} must be between 1 and the global rank {r_global}")
    if rslora:
        return alpha * math.sqrt(r_silo) / math.sqrt(r_global)
    return alpha * r_silo / r_global


def pad_rank(
    state: Mapping[str, torch.Tensor],
    r_global: int,
    a_from: Mapping[str, torch.Tensor] | None = None,
) -> State:
    """Pad every LoRA pair to rank `r_global`: zero extra columns of B, zero extra rows of A.

    With `a_from` (the global state) the extra rows of A are copied from it instead: the
    product is the same (B's extra columns are zero), and a frozen A (ffa-lora) keeps a
    zero delta.
    """
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        a, b = state[a_key], state[b_key]
        check_pair(a_key, a, b_key, b)
        extra = r_global - a.shape[0]
        if extra < 0:
            raise ValueError(f"{a_key}: rank {a.shape[0]} exceeds the global rank {r_global}")
        out[a_key] = F.pad(a, (0, 0, 0, extra))
        if a_from is not None and extra:
            out[a_key][a.shape[0] :] = a_from[a_key][a.shape[0] :].to(a.dtype)
        out[b_key] = F.pad(b, (0, extra))
    return out


def truncate_rank(state: Mapping[str, torch.Tensor], r_silo: int) -> State:
    """Keep the first `r_silo` LoRA components: rows of A, columns of B."""
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        a, b = state[a_key], state[b_key]
        check_pair(a_key, a, b_key, b)
        if not 1 <= r_silo <= a.shape[0]:
            raise ValueError(f"{a_key}: cannot truncate rank {a.shape[0]} to {r_silo}")
        out[a_key] = a[:r_silo].clone()
        out[b_key] = b[:, :r_silo].clone()
    return out


def component_weights(contributions: Sequence[tuple[int, float]], r_global: int) -> torch.Tensor:
    """Per LoRA component j < r_global: the summed weight of the silos whose rank exceeds j."""
    weights = torch.zeros(r_global, dtype=torch.float64)
    for rank, weight in contributions:
        weights[: min(rank, r_global)] += weight
    return weights


def rescale_components(total: State, contributions: Sequence[tuple[int, float]], r_global: int) -> bool:
    """Turn a weighted sum of padded deltas into per-component averages over their trainers.

    `total` is sum_i w_i * delta_i (what `WeightedSum` holds) and `contributions` the (rank, w_i)
    of the folded updates. Component j of every LoRA pair (row j of A, column j of B) is scaled
    by W / W_j (W the total weight, W_j that of the silos of rank > j), so dividing by W later
    averages it over exactly those silos. Components nobody trained stay zero. In place; returns
    whether anything changed (all silos at the global rank: nothing to do).
    """
    per_component = component_weights(contributions, r_global)
    overall = sum(w for _, w in contributions)
    if overall <= 0 or bool((per_component == overall).all()):
        return False
    factor = torch.where(per_component > 0, overall / per_component.clamp(min=1e-300), torch.ones_like(per_component))
    for name, tensor in total.items():  # A and B alone: a secure ffa-lora sum carries no A
        if name.endswith(LORA_A) or name.endswith(LORA_B):
            axis = 0 if name.endswith(LORA_A) else 1
            if tensor.dim() != 2 or tensor.shape[axis] != r_global:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not have the global rank {r_global}")
            tensor.mul_(factor.to(tensor.dtype)[:, None] if axis == 0 else factor.to(tensor.dtype)[None, :])
    return True
