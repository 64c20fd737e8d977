"""Resource-aware local work: give each silo the steps that fit a common round time.

A silo measured at `throughput` examples/s takes steps * batch_size / throughput seconds.
The target round time defaults to the median silo's time for the default steps, so the
median silo keeps its steps, faster silos do more and slower silos fewer, bounded to
[1, max_factor * default_steps]. Silos without a measurement keep the default.

Only steps are adapted: a LoRA step's time is dominated by the frozen base model's
forward and backward passes, so a smaller rank barely shortens it (it saves memory and
upload bytes instead; set `silos[].rank` for that).

Unequal steps must not buy influence: a silo that took 4x the steps moves about 4x as far,
and an example-weighted mean of such deltas drifts towards the fast silos' own objectives
(the objective inconsistency FedNova, Wang et al. 2020, corrects). Each silo therefore
normalises its delta to the job's `localSteps` before upload (`normalise_steps`): it sends
delta * localSteps / its_steps, so every silo's pull has the size of the same work and the
weights stay the example counts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch

from fedsilo.adapters import State


def assign_steps(
    throughput: Mapping[str, float | None],
    default_steps: int,
    batch_size: int,
    max_factor: float = 4.0,
    target_seconds: float | None = None,
) -> dict[str, int]:
    """Local steps per silo so that every silo needs about `target_seconds` per round."""
    if default_steps < 1:
        raise ValueError(f"default_steps must be >= 1, got {default_steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_factor < 1:
        raise ValueError(f"max_factor must be >= 1, got {max_factor}")
    measured = {s: t for s, t in throughput.items() if t is not None and t > 0 and math.isfinite(t)}
    if target_seconds is None:
        if not measured:
            return {s: default_steps for s in throughput}
        target_seconds = statistics.median(
            default_steps * batch_size / t for t in measured.values()
        )
    if not target_seconds > 0:
        raise ValueError(f"target_seconds must be > 0, got {target_seconds}")
    upper = max(1, math.floor(max_factor * default_steps))
    steps = {}
    for silo in throughput:
        if silo not in measured:
            steps[silo] = default_steps
            continue
        ideal = round(target_seconds * measured[silo] / batch_size)
        steps[silo] = min(upper, max(1, ideal))
    return steps


def normalise_steps(delta: Mapping[str, torch.Tensor], steps: int, reference_steps: int | None) -> State:
    """`delta` scaled to `reference_steps` of local work (FedNova-style); unchanged when equal or unset."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if reference_steps is None or reference_steps == steps:
        return dict(delta)
    factor = reference_steps / steps
    return {name: tensor * factor for name, tensor in delta.items()}
