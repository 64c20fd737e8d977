"""An accumulator that keeps every update, for statistics a running sum cannot give.

Coordinate-wise median and trimmed mean need all n updates at once, so they cost
O(silos x adapter) memory. With `spill_dir` each update is written as a safetensors file
and read back one tensor name at a time, so the peak memory at aggregation is
O(silos x largest tensor) instead.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedsilo.adapters import State
from fedsilo.strategies.base import check_weight


class UpdateList:
    """All updates of a round, in memory or spilled to a private temp folder."""

    def __init__(self, spill_dir: Path | None = None) -> None:
        self.weights: list[float] = []
        self._memory: list[State] = []
        self._files: list[Path] = []
        self._dir = (
            Path(tempfile.mkdtemp(prefix="fedsilo-updates-", dir=spill_dir)) if spill_dir else None
        )

    @property
    def count(self) -> int:
        return len(self.weights)

    @property
    def weight(self) -> float:
        return sum(self.weights)

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        check_weight(weight)
        tensors = {k: v.detach().float().contiguous().clone() for k, v in delta.items()}
        if self._dir is None:
            self._memory.append(tensors)
        else:
            path = self._dir / f"{self.count:06d}.safetensors"
            save_file(tensors, str(path))
            self._files.append(path)
        self.weights.append(weight)

    def stacked(self, name: str) -> torch.Tensor:
        """Tensor `name` of every update, stacked along a new first dimension."""
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        try:
            if self._dir is None:
                return torch.stack([u[name] for u in self._memory])
            parts = []
            for path in self._files:
                with safe_open(str(path), framework="pt") as f:
                    parts.append(f.get_tensor(name))
            return torch.stack(parts)
        except KeyError:
            raise ValueError(f"an update lacks tensor {name!r}") from None

    def close(self) -> None:
        """Drop the kept updates (and the spill folder)."""
        self._memory.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
