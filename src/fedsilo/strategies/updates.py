"""An accumulator that keeps every update, for statistics a running sum cannot give.

Coordinate-wise median and trimmed mean need all n updates at once. An update that is
still exactly the bytes of a safetensors file (`Stored`: the aggregator passes each
accepted update with its content-addressed blob, which stays on disk until the round
has closed) is kept as that file's path, nothing copied; any other update is kept in
memory, or written to `spill_dir` when one is set. At aggregation each tensor name is
read from every update in turn, so the peak memory is O(silos x largest tensor) for
referenced or spilled updates, instead of O(silos x adapter).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedsilo.adapters import State
from fedsilo.strategies.base import check_weight


class Stored(dict[str, torch.Tensor]):
    """An update's tensors together with the safetensors file that holds exactly them.

    Whoever passes one promises the file stays unchanged until the round is aggregated.
    A transform (clipping, noise) returns a plain dict, which drops the reference.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
        super().__init__(tensors)
        self.path = path


class UpdateList:
    """All updates of a round: referenced files, in memory, or spilled to a private temp folder."""

    def __init__(self, spill_dir: Path | None = None) -> None:
        self.weights: list[float] = []
        self._memory: list[State] = []
        self._files: list[Path] = []
        self._spill_dir = spill_dir
        self._dir: Path | None = None

    @property
    def count(self) -> int:
        return len(self.weights)

    @property
    def weight(self) -> float:
        return sum(self.weights)

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        check_weight(weight)
        if isinstance(delta, Stored):
            self._files.append(delta.path)
        else:
            tensors = {k: v.detach().float().contiguous().clone() for k, v in delta.items()}
            if self._spill_dir is None:
                self._memory.append(tensors)
            else:
                if self._dir is None:
                    self._dir = Path(tempfile.mkdtemp(prefix="fedsilo-updates-", dir=self._spill_dir))
                path = self._dir / f"{self.count:06d}.safetensors"
                save_file(tensors, str(path))
                self._files.append(path)
        self.weights.append(weight)

    def stacked(self, name: str) -> torch.Tensor:
        """Tensor `name` of every update (float32), stacked along a new first dimension."""
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        try:
            parts = [u[name] for u in self._memory]
            for path in self._files:
                with safe_open(str(path), framework="pt") as f:
                    parts.append(f.get_tensor(name).float())
            return torch.stack(parts)
        except (KeyError, SafetensorError):
            raise ValueError(f"an update lacks tensor {name!r}") from None

    def close(self) -> None:
        """Drop the kept updates (and the spill folder; referenced files belong to their owner)."""
        self._memory.clear()
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
