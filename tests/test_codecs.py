"""Update codecs, pure: round trips within their error bounds, error feedback, and hostile payloads refused."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
import torch
import zstandard
from safetensors.torch import save as st_save

from fedsilo.adapters import AdapterError, State, schema_of, to_bytes
from fedsilo.codecs import IDX, META, SCALE, VAL, codec_name, decode, encode, is_plain, k_for, needs_decode
from fedsilo.silo_agent.uplink import Uplink
from fedsilo.spec import CodecSpec
from fedsilo.strategies.ffa_lora import omitted_names

A, B, HEAD = "m.lora_A.weight", "m.lora_B.weight", "classifier.bias"


def codec(**fields: Any) -> CodecSpec:
    return CodecSpec.model_validate(fields)


def _delta(seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(8, 48, generator=g) * 1e-2,
        B: torch.randn(32, 8, generator=g) * torch.logspace(-4, -1, 32).unsqueeze(1),  # rows of very different size
        HEAD: torch.randn(2, generator=g) * 1e-3,
    }


def _round_trip(delta: State, c: CodecSpec, omitted: frozenset[str] = frozenset()) -> tuple[bytes, State, State]:
    data, residual = encode(delta, c, [n for n in sorted(delta) if n not in omitted])
    return data, decode(data, c, schema_of(delta), 10**8, omitted), residual


def _refused(data: bytes, c: CodecSpec, reason: str, delta: State | None = None, max_bytes: int = 10**8) -> str:
    with pytest.raises(AdapterError) as info:
        decode(data, c, schema_of(delta or _delta()), max_bytes)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


# ---- round trips ----------------------------------------------------------------------


def test_plain_fp32_is_todays_payload_bit_for_bit() -> None:
    delta = _delta()
    data, out, residual = _round_trip(delta, CodecSpec())
    assert is_plain(CodecSpec()) and data == to_bytes(delta) and residual == {}
    assert all(torch.equal(out[n], delta[n]) for n in delta)


@pytest.mark.parametrize(("dtype", "rel"), [("fp16", 2**-11), ("bf16", 2**-8)])
def test_half_precision_relative_error(dtype: str, rel: float) -> None:
    delta = _delta()
    data, out, _ = _round_trip(delta, codec(dtype=dtype))
    for name, x in delta.items():
        assert out[name].dtype == torch.float32 and out[name].shape == x.shape
        # fp16 has subnormals below 2^-14: there the error is half their spacing, 2^-25
        assert ((out[name] - x).abs() <= rel * x.abs() + 2**-25).all(), name
    assert len(data) < 0.6 * len(to_bytes(delta))


@pytest.mark.parametrize("scale", ["tensor", "channel"])
def test_int8_error_is_at_most_half_a_scale(scale: str) -> None:
    delta = _delta()
    c = codec(dtype="int8", int8Scale=scale)
    data, out, _ = _round_trip(delta, c)
    from safetensors.torch import load

    scales = {k.removesuffix(SCALE): v for k, v in load(data).items() if k.endswith(SCALE)}
    for name, x in delta.items():
        s = scales[name]
        bound = s.reshape(-1, 1) if s.dim() else s
        assert ((out[name] - x).abs() <= bound / 2 * (1 + 1e-5)).all(), name
    assert scales[B].shape == ((32,) if scale == "channel" else ())
    assert scales[HEAD].shape == ()  # a 1-D tensor has one scale either way
    # rows of very different magnitude: per-channel scales lose far less on the small rows
    if scale == "channel":
        _, per_tensor, _ = _round_trip(delta, codec(dtype="int8", int8Scale="tensor"))
        assert (out[B] - delta[B]).abs()[:8].max() < (per_tensor[B] - delta[B]).abs()[:8].max() / 10


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_top_k_keeps_exactly_the_k_largest(dtype: str) -> None:
    delta = _delta()
    _, out, residual = _round_trip(delta, codec(dtype=dtype, topK=0.1))
    for name, x in delta.items():
        k = k_for(x.numel(), 0.1)
        kept = set(torch.nonzero(out[name].reshape(-1)).reshape(-1).tolist())
        largest = set(torch.topk(x.abs().reshape(-1), k).indices.tolist())
        assert kept == largest, name
        assert torch.allclose(out[name] + residual[name], x, atol=1e-7)  # the rest waits in the residual
    assert k_for(2, 0.1) == 1 and k_for(384, 0.01) == 4


def test_zstd_is_lossless_and_smaller_when_there_is_redundancy() -> None:
    delta = {**_delta(), "zeros": torch.zeros(64, 64)}
    data, out, residual = _round_trip(delta, codec(zstd=True))
    assert data[:4] == b"\x28\xb5\x2f\xfd" and residual == {}
    assert all(torch.equal(out[n], delta[n]) for n in delta)
    assert len(data) < len(to_bytes(delta)) / 2


def test_frozen_tensors_do_not_travel_and_decode_as_zeros() -> None:
    delta = _delta()
    omitted = omitted_names(delta, {"freeze_lora_a": True})
    assert omitted == {A}
    for c in (CodecSpec(), codec(dtype="int8", topK=0.5, zstd=True)):
        data, out, _ = _round_trip(delta, c, omitted)
        assert torch.equal(out[A], torch.zeros(8, 48)) and set(out) == set(delta)
        body = zstandard.ZstdDecompressor().decompress(data) if c.zstd else data
        assert b"lora_A" not in body
    assert omitted_names(delta, {}) == frozenset()
    assert needs_decode(CodecSpec(), omitted) and not needs_decode(CodecSpec()) and needs_decode(codec(zstd=True))


def test_error_feedback_sum_of_decoded_updates_tracks_the_true_sum() -> None:
    """Over many rounds, sum(decoded) = sum(true) - final residual, and the residual stays bounded."""
    for c in (codec(dtype="int8", topK=0.05), codec(topK=0.01), codec(dtype="bf16")):
        residual: State = {}
        true = {n: torch.zeros_like(t) for n, t in _delta().items()}
        sent = {n: torch.zeros_like(t) for n, t in _delta().items()}
        norms = []
        for r in range(60):
            delta = _delta(seed=r)
            data, residual = encode(delta, c, sorted(delta), residual)
            decoded = decode(data, c, schema_of(delta), 10**8)
            for n in delta:
                true[n] += delta[n]
                sent[n] += decoded[n]
            norms.append(math.sqrt(sum(float((v**2).sum()) for v in residual.values())))
        for n in true:
            assert torch.allclose(sent[n] + residual[n], true[n], atol=1e-5), codec_name(c)
        gap = math.sqrt(sum(float(((true[n] - sent[n]) ** 2).sum()) for n in true))
        total = math.sqrt(sum(float((v**2).sum()) for v in true.values()))
        assert max(norms[30:]) < 3 * max(norms[:30]) + 1e-9  # bounded, not growing with the rounds
        assert gap < 0.5 * total, codec_name(c)  # the decoded sum converges to the true one
    # without error feedback the dropped part is simply lost
    _, residual = encode(_delta(), codec(topK=0.01, errorFeedback=False), sorted(_delta()))
    assert residual == {}


def test_uplink_keeps_the_residual_across_restarts_and_drops_it_for_another_codec(tmp_path: Any) -> None:
    c = codec(dtype="int8", topK=0.1)
    up = Uplink(c, "job/alpha", tmp_path)
    up.encode(1, _delta(), {})
    assert up.residual == {}  # only a counted upload moves the residual on
    up.commit()
    saved = up.residual
    again = Uplink(c, "job/alpha", tmp_path)
    assert again.round == 1 and all(torch.equal(again.residual[n], saved[n]) for n in saved)
    assert Uplink(codec(dtype="int8", topK=0.2), "job/alpha", tmp_path).residual == {}
    assert Uplink(c, "job/beta", tmp_path).residual == {}
    # a residual is never added twice to the same round
    first = again.encode(1, _delta(), {})
    assert first == Uplink(c, "job/alpha").encode(1, _delta(), {})


# ---- spec -----------------------------------------------------------------------------


def test_codec_name_is_recorded_and_a_different_codec_is_refused() -> None:
    data, _ = encode(_delta(), codec(dtype="int8", int8Scale="tensor"), sorted(_delta()))
    (size,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8 : 8 + size])["__metadata__"][META] == "int8-tensor"
    assert "is int8-channel" in _refused(data, codec(dtype="int8"), "bad_codec")
    assert "plain fp32" in _refused(to_bytes(_delta()), codec(dtype="fp16"), "bad_codec")
    _refused(data, CodecSpec(), "bad_codec")
    _refused(to_bytes(_delta()), codec(zstd=True), "bad_codec")


# ---- hostile payloads -----------------------------------------------------------------


def _coded(tensors: dict[str, torch.Tensor], c: CodecSpec) -> bytes:
    return st_save(tensors, metadata={META: codec_name(c)})


def _sparse_int8(**override: torch.Tensor) -> dict[str, torch.Tensor]:
    """A valid int8 + topK 0.1 (per-tensor scales) payload's tensors, with `override` replaced."""
    data, _ = encode(_delta(), SPARSE, sorted(_delta()))
    from safetensors.torch import load

    return {**load(data), **override}


SPARSE = codec(dtype="int8", int8Scale="tensor", topK=0.1)


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        (_sparse_int8(**{B + IDX: torch.tensor([0, 0, 1], dtype=torch.int32)}), "bad_index"),  # not unique
        (_sparse_int8(**{HEAD + IDX: torch.tensor([2], dtype=torch.int32)}), "bad_index"),  # out of range
        (_sparse_int8(**{HEAD + IDX: torch.tensor([-1], dtype=torch.int32)}), "bad_index"),
        (_sparse_int8(**{A + IDX: torch.arange(38, -1, -1, dtype=torch.int32)}), "bad_index"),  # descending
        (_sparse_int8(**{A + IDX: torch.arange(200, dtype=torch.int32),
                         A + VAL: torch.ones(200, dtype=torch.int8)}), "bad_index"),  # k above topK's
        (_sparse_int8(**{A + IDX: torch.arange(38, dtype=torch.int32)}), "wrong_shape"),  # 38 indices, 39 values
        (_sparse_int8(**{A + IDX: torch.arange(39, dtype=torch.int64)}), "wrong_dtype"),
        (_sparse_int8(**{A + VAL: torch.ones(39)}), "wrong_dtype"),  # float values where int8 is due
        (_sparse_int8(**{A + SCALE: torch.tensor(-1.0)}), "bad_scale"),
        (_sparse_int8(**{A + SCALE: torch.tensor(0.0)}), "bad_scale"),
        (_sparse_int8(**{A + SCALE: torch.tensor(float("inf"))}), "bad_scale"),
        (_sparse_int8(**{A + SCALE: torch.ones(8)}), "wrong_shape"),
        (_sparse_int8(**{A + SCALE: torch.tensor(3e38)}), "not_finite"),  # int8 * a huge scale overflows
        (_sparse_int8(**{"extra": torch.zeros(1)}), "wrong_names"),
    ],
)
def test_hostile_sparse_int8_payloads_are_refused(tensors: dict[str, torch.Tensor], reason: str) -> None:
    _refused(_coded(tensors, SPARSE), SPARSE, reason)


def test_missing_tensor_wrong_shape_and_non_finite_half_values_are_refused() -> None:
    c = codec(dtype="fp16")
    good, _ = encode(_delta(), c, sorted(_delta()))
    from safetensors.torch import load

    tensors = load(good)
    _refused(_coded({k: v for k, v in tensors.items() if k != B}, c), c, "wrong_names")
    _refused(_coded({**tensors, B: torch.zeros(8, 32, dtype=torch.float16)}, c), c, "wrong_shape")
    _refused(_coded({**tensors, B: torch.full((32, 8), float("nan"), dtype=torch.float16)}, c), c, "not_finite")
    _refused(_coded({**tensors, B: torch.zeros(32, 8)}, c), c, "wrong_dtype")
    ch = codec(dtype="int8")
    good8 = load(encode(_delta(), ch, sorted(_delta()))[0])
    _refused(_coded({**good8, B + SCALE: torch.ones(31)}, ch), ch, "wrong_shape")  # one scale per output row
    _refused(_coded({**good8, B + SCALE: torch.tensor(1.0)}, ch), ch, "wrong_shape")
    # the frozen A of ffa-lora must not be sent either
    with pytest.raises(AdapterError) as info:
        decode(good, c, schema_of(_delta()), 10**8, frozenset({A}))
    assert info.value.reason == "wrong_names"


def test_garbage_oversize_and_zstd_bombs_are_refused() -> None:
    z = codec(dtype="int8", zstd=True)
    _refused(b"", CodecSpec(), "malformed")
    _refused(b"garbage!garbage!", codec(dtype="int8"), "malformed")
    _refused(b"\x28\xb5\x2f\xfd" + b"garbage", z, "malformed")
    good, _ = encode(_delta(), z, sorted(_delta()))
    _refused(good, z, "too_large", max_bytes=len(good) - 1)
    # a bomb: a few KiB that declare (and do) decompress to 64 MiB, far above what the schema can need
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    assert len(bomb) < 10_000
    assert "decompresses to more than" in _refused(bomb, z, "too_large")
    # the same without a declared size (streamed frame), and hidden behind a valid first frame
    streamed = zstandard.ZstdCompressor().compressobj()
    sneaky = streamed.compress(b"\0" * (64 << 20)) + streamed.flush()
    _refused(sneaky, z, "too_large")
    _refused(good + bomb, z, "too_large")
