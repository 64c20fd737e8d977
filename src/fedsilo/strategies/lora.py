"""LoRA factor pairs in PEFT's layout, and the exact sum of their products.

`get_peft_model_state_dict` names a LoRA-wrapped module's factors
`<module>.lora_A.weight` (r x in_features) and `<module>.lora_B.weight` (out_features x r);
the layer's delta-weight is scale * B @ A with scale = alpha / r. Everything here works on
the unscaled product B @ A: every silo and the global adapter share one scale (see
`ranks.silo_alpha`), so the scale factors out of every sum and every re-factorisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
# Row norm of an A initialised as PEFT does (Kaiming-uniform, a=sqrt(5)): 1/sqrt(3), any width.
PEFT_INIT_A_ROW_NORM = 1 / math.sqrt(3)


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map each LoRA module prefix to its (A key, B key); a half-pair is an error."""
    names = set(names)
    prefixes = {n.removesuffix(LORA_A) for n in names if n.endswith(LORA_A)}
    prefixes |= {n.removesuffix(LORA_B) for n in names if n.endswith(LORA_B)}
    pairs: dict[str, tuple[str, str]] = {}
    for prefix in sorted(prefixes):
        a_key, b_key = prefix + LORA_A, prefix + LORA_B
        if a_key not in names or b_key not in names:
            raise ValueError(f"LoRA module {prefix!r} needs both {LORA_A[1:]} and {LORA_B[1:]}")
        pairs[prefix] = (a_key, b_key)
    return pairs


def check_pair(a_key: str, a: torch.Tensor, b_key: str, b: torch.Tensor) -> None:
    """A is r x in, B is out x r (2-D, linear layers only)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{a_key}: only 2-D (linear) LoRA factors are supported, got {tuple(a.shape)}"
        )
    if a.shape[0] != b.shape[1]:
        raise ValueError(
            f"{b_key}: shape {tuple(b.shape)} does not match rank {a.shape[0]} of {a_key}"
        )


def dense_products(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """prefix -> B @ A (float64, unscaled) for every LoRA pair of `state`."""
    out = {}
    for prefix, (a_key, b_key) in lora_pairs(state).items():
        check_pair(a_key, state[a_key], b_key, state[b_key])
        out[prefix] = state[b_key].double() @ state[a_key].double()
    return out


class LowRankSum:
    """Exact running sum of w_i * B_i @ A_i for one layer, in bounded memory.

    Kept factored (left @ right). New factor pairs are queued, and when the queue would
    double the held width the whole is re-compressed exactly: QR of both sides and an SVD
    of the small core keep the numerical rank only (singular values above `RTOL` times the
    largest, and at least the largest rank added), so silos whose updates share directions
    (a frozen A as in FFA-LoRA, similar updates) cost their joint rank, not the sum of
    their ranks. Once the factors would reach the size of the dense out x in matrix, it
    folds into that matrix instead. Memory: at most about min(2 x joint rank x (out + in),
    2 x out x in) float64 values per layer, whatever the number of silos; time: amortised
    O((out + in) x width) per update, with no copy of the held factors per update.
    """

    RTOL = 1e-12  # relative to the largest singular value: float64 round-off, far below float32

    def __init__(self, out_features: int, in_features: int) -> None:
        self.shape = (out_features, in_features)
        self.left = torch.zeros(out_features, 0, dtype=torch.float64)
        self.right = torch.zeros(0, in_features, dtype=torch.float64)
        self.dense: torch.Tensor | None = None
        self._queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._queued = 0  # columns waiting in the queue
        self._floor = 0  # the largest rank added: a re-factorisation to it needs that many directions

    @property
    def held(self) -> int:
        """float64 values held (factors, queue, or the dense matrix): the memory bound's subject."""
        if self.dense is not None:
            return self.dense.numel()
        out_features, in_features = self.shape
        return (self.left.shape[1] + self._queued) * (out_features + in_features)

    def add(self, b: torch.Tensor, a: torch.Tensor, weight: float) -> None:
        b, a = b.double() * weight, a.double()
        if self.dense is not None:
            self.dense.addmm_(b, a)
            return
        self._queue.append((b, a))
        self._queued += a.shape[0]
        self._floor = max(self._floor, a.shape[0])
        out_features, in_features = self.shape
        width = self.left.shape[1] + self._queued
        doubled = width >= 2 * max(self.left.shape[1], 1)
        if doubled or width * (out_features + in_features) >= out_features * in_features:
            self._compress()

    def _flush(self) -> None:
        """Append the queued factors to the held ones (one copy per compression, not per update)."""
        if self._queue:
            self.left = torch.cat([self.left, *(b for b, _ in self._queue)], dim=1)
            self.right = torch.cat([self.right, *(a for _, a in self._queue)], dim=0)
            self._queue, self._queued = [], 0

    def _compress(self) -> None:
        self._flush()
        out_features, in_features = self.shape
        u, s, vh = self._factored_svd()
        keep = int((s > self.RTOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        keep = max(keep, min(self._floor, s.numel()))  # weak directions kept too: see `refactor`'s floor
        if keep * (out_features + in_features) >= out_features * in_features:
            self.dense = self.left @ self.right
            self.left, self.right = self.left[:, :0], self.right[:0]
            return
        self.left, self.right = u[:, :keep] * s[:keep], vh[:keep].contiguous()

    def _factored_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_left, r_left = torch.linalg.qr(self.left)
        q_right, r_right = torch.linalg.qr(self.right.T)
        u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
        return q_left @ u, s, vh @ q_right.T

    def matrix(self) -> torch.Tensor:
        """The dense sum (for tests and small layers)."""
        self._flush()
        return self.dense.clone() if self.dense is not None else self.left @ self.right

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD (U, S, Vh) of the sum, via QR of the factors while it is factored."""
        self._flush()
        if self.dense is not None:
            return torch.linalg.svd(self.dense, full_matrices=False)
        return self._factored_svd()


@dataclass
class Refactored:
    """Rank-r factors of a product, and the squared Frobenius norms to judge the truncation."""

    b: torch.Tensor
    a: torch.Tensor
    tail_sq: float
    total_sq: float

    @property
    def relative_error(self) -> float:
        """||M - B A||_F / ||M||_F (0 for M = 0)."""
        return math.sqrt(self.tail_sq / self.total_sq) if self.total_sq > 0 else 0.0


def refactor(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, min_a_row_norm: float
) -> Refactored:
    """Best rank-`rank` factors B (out x r), A (r x in) of U diag(S) Vh (Eckart-Young).

    Balanced split B = U_r S_r^{1/2}, A = S_r^{1/2} V_r^T, except that A's row norms never
    fall below `min_a_row_norm`: a component with singular value s < min_a_row_norm^2 gets
    A row = min_a_row_norm * v^T and B column = s / min_a_row_norm * u. B @ A is the same
    either way; the floor keeps weak or empty components trainable (with B = 0 and A = 0 a
    LoRA component receives no gradient, with A != 0 it does, as at PEFT's initialisation).
    """
    if rank > s.shape[0]:
        raise ValueError(f"LoRA rank {rank} exceeds the layer's largest possible rank {s.shape[0]}")
    s_r = s[:rank]
    a_scale = torch.sqrt(torch.clamp(s_r, min=min_a_row_norm**2))
    b_scale = torch.where(a_scale > 0, s_r / torch.where(a_scale > 0, a_scale, 1.0), 0.0)
    total_sq = float((s**2).sum())
    tail_sq = float((s[rank:] ** 2).sum())
    return Refactored(
        b=u[:, :rank] * b_scale, a=a_scale[:, None] * vh[:rank], tail_sq=tail_sq, total_sq=total_sq
    )
