"""The pipeline every upload passes before it reaches an accumulator.

Each check is a small function that raises `AdapterError(reason, message)`; the reason
becomes the `reason` label of `fedsilo_updates_rejected_total`. Transforms that later
work adds (clipping, noise, unmasking) append to the same tuple.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedsilo import codecs
from fedsilo.adapters import (
    AdapterError,
    Schema,
    State,
    check_finite,
    check_schema,
    from_bytes,
    sha256,
)
from fedsilo.spec import CodecSpec
from fedsilo.strategies import ClientConfig
from fedsilo.strategies.ffa_lora import omitted_names


@dataclass
class Upload:
    data: bytes
    claimed_sha256: str
    schema: Schema
    max_bytes: int
    codec: CodecSpec = codecs.PLAIN
    omitted: frozenset[str] = frozenset()
    state: State = field(default_factory=dict)


def _check_digest(upload: Upload) -> None:
    actual = sha256(upload.data)
    if actual != upload.claimed_sha256.lower():
        raise AdapterError("bad_checksum", f"sha256 of the body is {actual}, header says {upload.claimed_sha256}")


def _parse(upload: Upload) -> None:
    """Decode the silo's codec into a full fp32 delta (zeros for the tensors that never travel)."""
    upload.state = codecs.decode(upload.data, upload.codec, upload.schema, upload.max_bytes, upload.omitted)


def _check_schema(upload: Upload) -> None:
    check_schema(upload.state, upload.schema)


def _check_finite(upload: Upload) -> None:
    check_finite(upload.state)


PIPELINE: tuple[Callable[[Upload], None], ...] = (_check_digest, _parse, _check_schema, _check_finite)


def validate_update(
    data: bytes,
    claimed_sha256: str,
    schema: Schema,
    max_bytes: int,
    codec: CodecSpec = codecs.PLAIN,
    hooks: ClientConfig | None = None,
) -> State:
    """Run every check; return the parsed delta or raise AdapterError.

    `codec` is the one in force for the sending silo; `hooks` (the strategy's client config)
    say which tensors do not travel.
    """
    if len(data) > max_bytes:
        raise AdapterError("too_large", f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    upload = Upload(data, claimed_sha256, schema, max_bytes, codec, omitted_names(schema, hooks or {}))
    for step in PIPELINE:
        step(upload)
    return upload.state


def accepted_delta(data: bytes, codec: CodecSpec, schema: Schema, hooks: ClientConfig) -> State:
    """An accepted update's stored bytes (kept as uploaded, coded) back to its delta, to rebuild an accumulator."""
    return codecs.decode(data, codec, schema, len(data), omitted_names(schema, hooks))


def validate_initial(data: bytes, max_bytes: int) -> State:
    """The initial adapter defines the schema: it only has to parse and be finite."""
    state = from_bytes(data, max_bytes)
    if not state:
        raise AdapterError("malformed", "the initial adapter has no tensors")
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise AdapterError("wrong_dtype", f"{name}: adapter tensors must be floating point, got {tensor.dtype}")
    check_finite(state)
    return state
