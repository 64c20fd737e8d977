"""Adapter state <-> bytes (safetensors only, never pickle), schemas and deltas.

An adapter state is a flat `dict[str, torch.Tensor]` exactly as peft's
`get_peft_model_state_dict` returns it. A schema is what every upload is checked against:
the names, shapes and dtypes of the global adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

State = dict[str, torch.Tensor]
Schema = dict[str, tuple[tuple[int, ...], str]]


class AdapterError(ValueError):
    """Bytes or tensors that are not a valid adapter (update) for this job."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_bytes(state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors as safetensors (contiguous CPU copies, deterministic order)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    return st_save(tensors, metadata=metadata)


def from_bytes(data: bytes, max_bytes: int | None = None) -> State:
    """Parse safetensors bytes; refuses oversize payloads before parsing."""
    if max_bytes is not None and len(data) > max_bytes:
        raise AdapterError("too_large", f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not data:
        raise AdapterError("malformed", "empty payload")
    try:
        return dict(st_load(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError("malformed", f"not a safetensors payload: {exc}") from None


def schema_of(state: Mapping[str, torch.Tensor]) -> Schema:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def check_schema(state: Mapping[str, torch.Tensor], schema: Schema) -> None:
    """Names, shapes and dtypes must match the global adapter exactly."""
    missing = sorted(set(schema) - set(state))
    extra = sorted(set(state) - set(schema))
    if missing or extra:
        raise AdapterError(
            "wrong_names", f"tensor names differ from the global adapter: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, (shape, dtype) in schema.items():
        tensor = state[name]
        got_dtype = str(tensor.dtype).removeprefix("torch.")
        if tuple(tensor.shape) != tuple(shape):
            raise AdapterError("wrong_shape", f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if got_dtype != dtype:
            raise AdapterError("wrong_dtype", f"{name}: dtype {got_dtype}, expected {dtype}")


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        # min and max propagate NaN and are infinite iff an element is: one pass, no boolean copy
        low, high = torch.aminmax(tensor)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise AdapterError("not_finite", f"{name}: contains NaN or infinity")


def delta(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> State:
    return {k: new[k].float() - base[k].float() for k in base}


def apply_delta(base: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> State:
    """base + update, keeping base's dtypes."""
    return {k: (base[k].float() + update[k].float()).to(base[k].dtype) for k in base}


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    return float(torch.sqrt(torch.stack([(t.float() ** 2).sum() for t in state.values()]).sum()))


@dataclass(frozen=True)
class Blob:
    """Adapter bytes with their content address."""

    data: bytes
    sha256: str

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Blob:
        data = to_bytes(state, metadata)
        return cls(data, sha256(data))
