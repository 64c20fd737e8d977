"""The pipeline every upload passes before it reaches an accumulator.

Each check is a small function that raises `AdapterError(reason, message)`; the reason
becomes the `reason` label of `fedsilo_updates_rejected_total`. Transforms that later
work adds (clipping, noise, unmasking) append to the same tuple.

An upload arrives as a `Staged` file (see `blobs.Receiver`): its sha256 was computed once,
while it streamed in. `read_delta` is the one place tensors are produced from an upload's
file, at acceptance and again when an accumulator is rebuilt from the stored blobs: a plain
fp32 upload is read through a map of the file, a coded one (or one that leaves tensors out
by contract) goes through `codecs.decode`. Which of the two it was travels with the result
(`Delta.verbatim`), so nothing else has to work it out again.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from fedsilo import codecs
from fedsilo.adapters import AdapterError, Schema, State, check_finite, check_schema
from fedsilo.aggregator.blobs import Staged
from fedsilo.spec import CodecSpec
from fedsilo.strategies import ClientConfig
from fedsilo.strategies.ffa_lora import omitted_names
from fedsilo.strategies.updates import Stored

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own ceiling on a header


@dataclass(frozen=True)
class Delta:
    """An update's tensors at full precision, and whether its file holds exactly them."""

    state: State
    verbatim: bool  # the file is a plain safetensors of exactly `state` (no codec, nothing omitted)

    def to_fold(self, path: Path) -> State:
        """What an accumulator receives; a verbatim file goes along (`Stored`), so robust
        strategies keep its path instead of the tensors."""
        return Stored(self.state, path) if self.verbatim else self.state


@dataclass
class Upload:
    body: Staged
    claimed_sha256: str
    schema: Schema
    max_bytes: int
    codec: CodecSpec = codecs.PLAIN
    omitted: frozenset[str] = frozenset()
    delta: Delta = field(default_factory=lambda: Delta({}, verbatim=False))


def load(path: Path) -> State:
    """The tensors of a safetensors file (read through a map of the file, not a second buffer of it)."""
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError("malformed", f"not a safetensors payload: {exc}") from None


def _header(path: Path) -> bytes:
    """The length prefix and JSON header of a safetensors file (what `codecs.metadata` reads)."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return prefix
        (size,) = struct.unpack("<Q", prefix)
        return prefix + f.read(min(size, MAX_HEADER))


def _check_size(upload: Upload) -> None:
    if upload.body.size > upload.max_bytes:
        raise AdapterError("too_large", f"payload of {upload.body.size} bytes exceeds the limit of {upload.max_bytes}")
    if upload.body.size == 0:
        raise AdapterError("malformed", "empty payload")


def _check_digest(upload: Upload) -> None:
    actual = upload.body.sha256  # hashed as it arrived: never a second pass over the bytes
    if actual != upload.claimed_sha256.lower():
        raise AdapterError("bad_checksum", f"sha256 of the body is {actual}, header says {upload.claimed_sha256}")


def read_delta(
    path: Path, codec: CodecSpec, schema: Schema, omitted: frozenset[str], max_bytes: int | None = None
) -> Delta:
    """The delta in the file at `path`, full precision, with zeros for the tensors that never travel."""
    if codecs.needs_decode(codec, omitted):
        data = path.read_bytes()
        return Delta(codecs.decode(data, codec, schema, max_bytes or len(data), omitted), verbatim=False)
    coded = codecs.metadata(_header(path)).get(codecs.META)
    if coded is not None:
        raise AdapterError("bad_codec", f"the payload is coded {coded}, but this silo's codec is plain fp32")
    return Delta(load(path), verbatim=True)


def _parse(upload: Upload) -> None:
    upload.delta = read_delta(upload.body.path, upload.codec, upload.schema, upload.omitted, upload.max_bytes)


def _check_schema(upload: Upload) -> None:
    check_schema(upload.delta.state, upload.schema)


def _check_finite(upload: Upload) -> None:
    check_finite(upload.delta.state)


PIPELINE: tuple[Callable[[Upload], None], ...] = (_check_size, _check_digest, _parse, _check_schema, _check_finite)


def validate_update(
    body: Staged,
    claimed_sha256: str,
    schema: Schema,
    max_bytes: int,
    codec: CodecSpec = codecs.PLAIN,
    hooks: ClientConfig | None = None,
) -> Delta:
    """Run every check; return the parsed delta or raise AdapterError.

    `codec` is the one in force for the sending silo; `hooks` (the strategy's client config)
    say which tensors do not travel.
    """
    upload = Upload(body, claimed_sha256, schema, max_bytes, codec, omitted_names(schema, hooks or {}))
    for step in PIPELINE:
        step(upload)
    return upload.delta


def accepted_delta(path: Path, codec: CodecSpec, schema: Schema, hooks: ClientConfig) -> Delta:
    """An accepted update's stored blob (kept as uploaded, coded) back to its delta, to rebuild an accumulator."""
    return read_delta(path, codec, schema, omitted_names(schema, hooks))


def validate_initial(body: Staged, max_bytes: int) -> State:
    """The initial adapter defines the schema: it only has to parse and be finite."""
    _check_size(Upload(body, body.sha256, {}, max_bytes))
    state = load(body.path)
    if not state:
        raise AdapterError("malformed", "the initial adapter has no tensors")
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise AdapterError("wrong_dtype", f"{name}: adapter tensors must be floating point, got {tensor.dtype}")
    check_finite(state)
    return state
