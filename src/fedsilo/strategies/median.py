"""Coordinate-wise median (Yin et al. 2018): the trimmed mean that keeps only the middle.

For an even count the two middle values are averaged. Unweighted, like `TrimmedMean`.
"""

from __future__ import annotations

from typing import ClassVar

from fedsilo.strategies.trimmed_mean import TrimmedMean


class Median(TrimmedMean):
    """Trim all but the middle one (odd n) or two (even n) values."""

    name = "median"
    defaults: ClassVar[dict[str, float]] = {}

    def check(self) -> None:
        pass

    def trim_count(self, n: int) -> int:
        return (n - 1) // 2
