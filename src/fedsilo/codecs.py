"""Update codecs: a silo's adapter delta <-> the bytes it uploads (safetensors, never pickle).

A coded payload is safetensors whose tensors depend on the codec (`CodecSpec`):
- fp32 / fp16 / bf16: `name` in that dtype (fp32 means the schema's own dtype);
- int8: `name` int8 plus `name::scale` float32, a scalar (int8Scale tensor) or one per
  output row (channel, tensors of two or more dimensions); value = int8 * scale;
- topK: `name::idx` int32 (flattened, sorted, unique) plus `name::val` instead of `name`;
- zstd: the whole safetensors body compressed.
The codec is named in the metadata (`fedsilo.codec`); the plain fp32 codec writes exactly
today's payload, without it. Tensors a strategy keeps at zero by contract (ffa-lora's
frozen A factors) are not sent and decode as zeros.

`decode` is the aggregator's parser for hostile bytes: everything is checked (names,
dtypes, shapes, indices, scales, finiteness) and decompression is bounded by what the
schema and codec can need, so nothing after it sees anything but a full-precision delta.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Mapping

import torch
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsilo.adapters import AdapterError, Schema, State, check_schema, schema_of
from fedsilo.spec import CodecSpec

META = "fedsilo.codec"
IDX, VAL, SCALE = "::idx", "::val", "::scale"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 9
WIRE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
HEADER_SLACK = 4096  # bytes of safetensors header a payload may need besides its tensors' entries
PLAIN = CodecSpec()


def is_plain(codec: CodecSpec) -> bool:
    """True when `codec` is today's plain fp32 safetensors (a fast path may skip `decode`)."""
    return codec.is_plain()


def needs_decode(codec: CodecSpec, omitted: Collection[str] = ()) -> bool:
    """False only when an upload is the schema's plain safetensors as is (a streaming fast path's test)."""
    return not is_plain(codec) or bool(omitted)


def codec_name(codec: CodecSpec) -> str:
    """The codec's wire name, recorded in the payload (error feedback is the silo's business)."""
    parts = [f"int8-{codec.scale}" if codec.dtype == "int8" else codec.dtype]
    if codec.top_k is not None:
        parts.append(f"top{codec.top_k!r}")
    if codec.zstd:
        parts.append("zstd")
    return "+".join(parts)


def is_lossless(codec: CodecSpec) -> bool:
    return codec.dtype == "fp32" and codec.top_k is None


def k_for(numel: int, fraction: float) -> int:
    """Entries top-k keeps of a tensor of `numel` entries (at least one)."""
    return min(numel, max(1, math.ceil(fraction * numel)))


def _rows(shape: tuple[int, ...], codec: CodecSpec) -> int | None:
    """Scales per tensor: one per output row (channel, 2+ dimensions), else None (one scalar)."""
    return shape[0] if codec.scale == "channel" and len(shape) >= 2 and shape[0] > 0 else None


def _wire_dtype(codec: CodecSpec, dtype: str) -> torch.dtype:
    return WIRE_DTYPES.get(codec.dtype) or getattr(torch, dtype)


def _expected(name: str, shape: tuple[int, ...], dtype: str, codec: CodecSpec) -> dict[str, tuple[torch.dtype, int]]:
    """The payload tensors carrying `name`: wire dtype and number of dimensions."""
    wire = _wire_dtype(codec, dtype)
    out = {name + IDX: (torch.int32, 1), name + VAL: (wire, 1)} if codec.top_k is not None else {name: (wire, -1)}
    if codec.dtype == "int8":
        out[name + SCALE] = (torch.float32, 0 if _rows(shape, codec) is None else 1)
    return out


# ---- encoding (silo) ----------------------------------------------------------------


def _quantise(values: torch.Tensor, rows: torch.Tensor | None, n_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: q = round(v / scale) with scale = max|v| / 127 per tensor or per row."""
    magnitude = values.abs()
    if n_rows is None:
        scale = magnitude.max() / 127 if magnitude.numel() else torch.tensor(0.0)
    elif rows is None:
        scale = magnitude.reshape(n_rows, -1).amax(dim=1) / 127
    else:
        scale = torch.zeros(n_rows).scatter_reduce(0, rows, magnitude, reduce="amax") / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()  # an all-zero row: any positive scale
    if n_rows is None:
        per_value = scale
    else:  # sparse values carry their row ids; dense ones broadcast one scale along each row
        per_value = scale[rows] if rows is not None else scale.reshape(-1, *[1] * (values.dim() - 1))
    return (values / per_value).round().clamp(-127, 127).to(torch.int8), scale


def _encode_tensor(name: str, x: torch.Tensor, codec: CodecSpec) -> dict[str, torch.Tensor]:
    shape = tuple(x.shape)
    values, rows, out = x, None, {}
    if codec.top_k is not None:
        flat = x.reshape(-1)
        idx = torch.topk(flat.abs(), k_for(flat.numel(), codec.top_k)).indices.sort().values
        values, out[name + IDX] = flat[idx], idx.to(torch.int32)
        row_size = math.prod(shape[1:]) if len(shape) >= 2 else 1
        rows = idx // max(row_size, 1)
    key = name + VAL if codec.top_k is not None else name
    if codec.dtype == "int8":
        out[key], out[name + SCALE] = _quantise(values, rows, _rows(shape, codec))
    elif codec.dtype in ("fp16", "bf16"):
        wire = WIRE_DTYPES[codec.dtype]
        limit = torch.finfo(wire).max  # clamp, not overflow to inf: error feedback keeps the rest
        out[key] = values.float().clamp(-limit, limit).to(wire)
    else:
        out[key] = values
    return out


def encode(
    delta: Mapping[str, torch.Tensor],
    codec: CodecSpec,
    names: Collection[str],
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[bytes, State]:
    """Encode the tensors `names` of `delta` (plus last round's residual) for upload.

    Returns the payload and the new residual, `(delta + residual) - decode(payload)`, for
    error feedback (empty when the codec is lossless or error feedback is off).
    """
    feedback = codec.error_feedback and not is_lossless(codec)
    target = {
        n: delta[n] + residual[n].to(delta[n].dtype) if feedback and residual and n in residual else delta[n]
        for n in sorted(names)
    }
    if is_plain(codec):
        return st_save({n: t.detach().cpu().contiguous() for n, t in target.items()}), {}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in target.items():
        tensors.update(_encode_tensor(name, tensor.detach().cpu().float(), codec))
    data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={META: codec_name(codec)})
    if codec.zstd:
        data = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    if not feedback:
        return data, {}
    schema = schema_of(target)
    decoded = decode(data, codec, schema, len(data))
    return data, {n: target[n].float() - decoded[n].float() for n in target}


# ---- decoding (aggregator: hostile bytes) ---------------------------------------------


def body_bound(schema: Schema, codec: CodecSpec, omitted: Collection[str] = ()) -> int:
    """The largest safetensors body a valid payload of `codec` can have for `schema`."""
    total = HEADER_SLACK
    for name, (shape, dtype) in schema.items():
        if name in omitted:
            continue
        numel = math.prod(shape)
        itemsize = _wire_dtype(codec, dtype).itemsize
        total += (k_for(numel, codec.top_k) * (4 + itemsize) if codec.top_k is not None else numel * itemsize)
        total += 4 * (_rows(tuple(shape), codec) or 1) if codec.dtype == "int8" else 0
        total += 3 * (len(name) + 160)  # header entries: name, dtype, shape, offsets
    return total


def _decompress(data: bytes, bound: int) -> bytes:
    """zstd, streamed and cut at `bound`: a frame's declared size is never trusted."""
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
            while len(out) <= bound:
                chunk = reader.read(bound + 1 - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise AdapterError("malformed", f"not a zstd payload: {exc}") from None
    if len(out) > bound:
        raise AdapterError("too_large", f"the payload decompresses to more than the {bound} bytes this codec can need")
    return bytes(out)


def metadata(body: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (the tensors themselves are parsed by safetensors)."""
    if len(body) < 8:
        raise AdapterError("malformed", "not a safetensors payload: shorter than its header length")
    (size,) = struct.unpack("<Q", body[:8])
    if size > len(body) - 8:
        raise AdapterError("malformed", "not a safetensors payload: header longer than the payload")
    try:
        header = json.loads(body[8 : 8 + size])
    except (UnicodeDecodeError, ValueError):
        raise AdapterError("malformed", "not a safetensors payload: header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _check_codec(body: bytes, codec: CodecSpec) -> None:
    got, want = metadata(body).get(META), codec_name(codec)
    if got != want and not (got is None and is_plain(codec)):
        raise AdapterError(
            "bad_codec", f"the payload is coded {got or 'plain fp32'}, but this silo's codec is {want}"
        )


def _check_scale(name: str, scale: torch.Tensor) -> torch.Tensor:
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise AdapterError("bad_scale", f"{name}: int8 scales must be finite and positive")
    return scale


def _check_indices(name: str, idx: torch.Tensor, numel: int, k_max: int) -> torch.Tensor:
    if idx.numel() > k_max:
        raise AdapterError("bad_index", f"{name}: {idx.numel()} entries, topK allows at most {k_max}")
    idx = idx.long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= numel):
        raise AdapterError("bad_index", f"{name}: index out of range [0, {numel})")
    if idx.numel() > 1 and not (idx[1:] > idx[:-1]).all():
        raise AdapterError("bad_index", f"{name}: indices must be sorted and unique")
    return idx


def _decode_tensor(name: str, shape: tuple[int, ...], got: State, codec: CodecSpec) -> torch.Tensor:
    numel = math.prod(shape)
    rows = _rows(shape, codec)
    values = got[name + VAL] if codec.top_k is not None else got[name]
    if codec.top_k is not None:
        idx = _check_indices(name, got[name + IDX], numel, k_for(numel, codec.top_k))
        if values.shape != idx.shape:
            raise AdapterError("wrong_shape", f"{name}: {values.numel()} values for {idx.numel()} indices")
    elif tuple(values.shape) != shape:
        raise AdapterError("wrong_shape", f"{name}: shape {tuple(values.shape)}, expected {shape}")
    decoded = values.float()
    if codec.dtype == "int8":
        scale = got[name + SCALE]
        if tuple(scale.shape) != (() if rows is None else (rows,)):
            raise AdapterError("wrong_shape", f"{name}{SCALE}: shape {tuple(scale.shape)}, expected {rows or ()}")
        scale = _check_scale(name + SCALE, scale)
        if rows is None:
            decoded = decoded * scale
        elif codec.top_k is not None:
            decoded = decoded * scale[idx // (numel // rows)]
        else:
            decoded = decoded * scale.reshape(-1, *[1] * (len(shape) - 1))
    if not torch.isfinite(decoded).all():
        raise AdapterError("not_finite", f"{name}: decodes to NaN or infinity")
    if codec.top_k is None:
        return decoded
    dense = torch.zeros(numel)
    dense[idx] = decoded
    return dense.reshape(shape)


def decode(
    data: bytes, codec: CodecSpec, schema: Schema, max_bytes: int, omitted: Collection[str] = ()
) -> State:
    """Parse an upload coded with `codec` into a delta of exactly `schema`'s names, shapes and dtypes.

    `omitted` names (zero by the strategy's contract) must be absent and come back as zeros.
    Raises AdapterError (bad_codec, malformed, too_large, wrong_names, wrong_dtype,
    wrong_shape, bad_index, bad_scale, not_finite) for anything else.
    """
    if len(data) > max_bytes:
        raise AdapterError("too_large", f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not data:
        raise AdapterError("malformed", "empty payload")
    if codec.zstd != data.startswith(ZSTD_MAGIC):
        raise AdapterError("bad_codec", f"this silo's codec is {codec_name(codec)}: the payload is "
                           f"{'' if data.startswith(ZSTD_MAGIC) else 'not '}zstd-compressed")
    body = _decompress(data, body_bound(schema, codec, omitted)) if codec.zstd else data
    _check_codec(body, codec)
    try:
        got = dict(st_load(body))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError("malformed", f"not a safetensors payload: {exc}") from None
    sent = {n: spec for n, spec in schema.items() if n not in omitted}
    if is_plain(codec):
        check_schema(got, sent)
        return {**got, **{n: torch.zeros(schema[n][0], dtype=getattr(torch, schema[n][1])) for n in omitted}}
    expected: dict[str, tuple[torch.dtype, int]] = {}
    for name, (shape, dtype) in sent.items():
        expected.update(_expected(name, tuple(shape), dtype, codec))
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise AdapterError("wrong_names", f"payload tensors differ from the codec's: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    for key, (wire, ndim) in expected.items():
        if got[key].dtype != wire:
            raise AdapterError("wrong_dtype", f"{key}: dtype {got[key].dtype}, expected {wire}")
        if ndim >= 0 and got[key].dim() != ndim:
            raise AdapterError("wrong_shape", f"{key}: {got[key].dim()} dimensions, expected {ndim}")
    out: State = {}
    for name, (shape, dtype_name) in schema.items():
        target = getattr(torch, dtype_name)
        if name in omitted:
            out[name] = torch.zeros(shape, dtype=target)
        else:
            out[name] = _decode_tensor(name, tuple(shape), got, codec).to(target)
    return out


def sent_names(schema: Schema | Collection[str], omitted: Collection[str]) -> list[str]:
    """The tensors that travel: every name but those zero by contract."""
    return sorted(n for n in schema if n not in omitted)
