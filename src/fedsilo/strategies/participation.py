"""Which joined silos train in a round: a deterministic sample per (seed, round)."""

from __future__ import annotations

import math
import random


def sample_silos(
    joined: list[str], fraction: float, min_count: int, seed: int, round: int
) -> list[str]:
    """Sample max(min_count, ceil(fraction * n)) of the n joined silos (all of them at most).

    The result depends only on the set of names, `seed` and `round` (not on the input
    order, the process or PYTHONHASHSEED), and is returned sorted.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"aggregation.fraction must be in (0, 1], got {fraction}")
    if min_count < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}")
    names = sorted(joined)
    if len(set(names)) != len(names):
        raise ValueError(
            f"joined silos contain duplicates: {sorted({n for n in names if names.count(n) > 1})}"
        )
    count = min(len(names), max(min_count, math.ceil(fraction * len(names))))
    rng = random.Random(f"fedsilo-participation:{seed}:{round}")
    return sorted(rng.sample(names, count))
