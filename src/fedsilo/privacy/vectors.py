"""An adapter delta as one flat vector, the form secure aggregation masks and sums.

The layout is the global adapter's schema in sorted key order; tensors every silo leaves
at zero by contract (ffa-lora's frozen A factors) are left out, so they cost no bytes and
come back as exact zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsilo.adapters import Schema, State


@dataclass(frozen=True)
class Layout:
    """Which tensors, in which order and shape, make up the vector; `zeros` are left out."""

    parts: tuple[tuple[str, tuple[int, ...]], ...]
    zeros: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.parts)


def layout(schema: Schema, zero: Callable[[str], bool] | None = None) -> Layout:
    """The vector layout for adapters of `schema`; tensors `zero` names are zero by contract."""
    parts: list[tuple[str, tuple[int, ...]]] = []
    zeros: list[tuple[str, tuple[int, ...]]] = []
    for name in sorted(schema):
        shape = tuple(schema[name][0])
        (zeros if zero is not None and zero(name) else parts).append((name, shape))
    return Layout(tuple(parts), tuple(zeros))


def flatten(state: Mapping[str, torch.Tensor], lay: Layout) -> np.ndarray:
    """The tensors of `lay`, in order, as one float64 vector."""
    if not lay.parts:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([state[name].detach().double().reshape(-1).numpy() for name, _ in lay.parts])


def unflatten(vector: np.ndarray, lay: Layout) -> State:
    """Back to named float64 tensors; the left-out tensors as zeros."""
    if vector.shape != (lay.size,):
        raise ValueError(f"vector has {vector.shape} elements, the layout {lay.size}")
    out: State = {}
    at = 0
    for name, shape in lay.parts:
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(np.array(vector[at : at + n], dtype=np.float64)).reshape(shape)
        at += n
    for name, shape in lay.zeros:
        out[name] = torch.zeros(shape, dtype=torch.float64)
    return out
