"""Adapter bytes, schema checks and deltas."""

from __future__ import annotations

import pytest
import torch

from fedsilo.adapters import (
    AdapterError,
    apply_delta,
    check_finite,
    check_schema,
    delta,
    from_bytes,
    schema_of,
    sha256,
    to_bytes,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.lora_A.weight": torch.randn(4, 16, generator=g),
        "layer.lora_B.weight": torch.randn(8, 4, generator=g),
    }


def test_round_trip_is_exact_and_deterministic() -> None:
    state = _state()
    data = to_bytes(state)
    back = from_bytes(data)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert sha256(to_bytes(back)) == sha256(data)


@pytest.mark.parametrize("payload", [b"", b"not safetensors at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}   "])
def test_malformed_bytes_are_refused(payload: bytes) -> None:
    with pytest.raises(AdapterError) as info:
        from_bytes(payload)
    assert info.value.reason == "malformed"


def test_size_limit_checked_before_parsing() -> None:
    with pytest.raises(AdapterError) as info:
        from_bytes(to_bytes(_state()), max_bytes=100)
    assert info.value.reason == "too_large"


def test_schema_names_shape_and_dtype() -> None:
    schema = schema_of(_state())
    check_schema(_state(), schema)
    wrong_shape = {**_state(), "layer.lora_A.weight": torch.zeros(5, 16)}
    with pytest.raises(AdapterError, match=r"shape \(5, 16\), expected \(4, 16\)"):
        check_schema(wrong_shape, schema)
    wrong_dtype = {**_state(), "layer.lora_B.weight": torch.zeros(8, 4, dtype=torch.float64)}
    with pytest.raises(AdapterError, match="dtype float64"):
        check_schema(wrong_dtype, schema)
    missing = {"layer.lora_A.weight": torch.zeros(4, 16)}
    with pytest.raises(AdapterError, match="missing"):
        check_schema(missing, schema)


def test_non_finite_values_are_refused() -> None:
    state = _state()
    state["layer.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(AdapterError) as info:
        check_finite(state)
    assert info.value.reason == "not_finite"


def test_delta_then_apply_restores_the_new_state() -> None:
    base, new = _state(), {k: v + 1 for k, v in _state().items()}
    restored = apply_delta(base, delta(new, base))
    assert all(torch.allclose(restored[k], new[k]) for k in base)
