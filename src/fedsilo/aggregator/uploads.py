"""The pipeline every upload passes before it reaches an accumulator.

Each check is a small function that raises `AdapterError(reason, message)`; the reason
becomes the `reason` label of `fedsilo_updates_rejected_total`. Transforms that later
work adds (clipping, noise, unmasking) append to the same tuple.

An upload arrives as a `Staged` file (see `blobs.Receiver`): its sha256 was computed once,
while it streamed in, and `load` is the one place its tensors are produced from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from fedsilo.adapters import AdapterError, Schema, State, check_finite, check_schema
from fedsilo.aggregator.blobs import Staged


@dataclass
class Upload:
    body: Staged
    claimed_sha256: str
    schema: Schema
    max_bytes: int
    state: State = field(default_factory=dict)


def load(path: Path) -> State:
    """The tensors of a safetensors file (read through a map of the file, not a second buffer of it)."""
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError("malformed", f"not a safetensors payload: {exc}") from None


def _check_size(upload: Upload) -> None:
    if upload.body.size > upload.max_bytes:
        raise AdapterError("too_large", f"payload of {upload.body.size} bytes exceeds the limit of {upload.max_bytes}")
    if upload.body.size == 0:
        raise AdapterError("malformed", "empty payload")


def _check_digest(upload: Upload) -> None:
    actual = upload.body.sha256  # hashed as it arrived: never a second pass over the bytes
    if actual != upload.claimed_sha256.lower():
        raise AdapterError("bad_checksum", f"sha256 of the body is {actual}, header says {upload.claimed_sha256}")


def _parse(upload: Upload) -> None:
    # The single place the parsed state is produced from the body (a coded payload decodes here).
    upload.state = load(upload.body.path)


def _check_schema(upload: Upload) -> None:
    check_schema(upload.state, upload.schema)


def _check_finite(upload: Upload) -> None:
    check_finite(upload.state)


PIPELINE: tuple[Callable[[Upload], None], ...] = (_check_size, _check_digest, _parse, _check_schema, _check_finite)


def validate_update(body: Staged, claimed_sha256: str, schema: Schema, max_bytes: int) -> State:
    """Run every check; return the parsed delta or raise AdapterError."""
    upload = Upload(body, claimed_sha256, schema, max_bytes)
    for step in PIPELINE:
        step(upload)
    return upload.state


def validate_initial(body: Staged, max_bytes: int) -> State:
    """The initial adapter defines the schema: it only has to parse and be finite."""
    upload = Upload(body, body.sha256, {}, max_bytes)
    _check_size(upload)
    _parse(upload)
    state = upload.state
    if not state:
        raise AdapterError("malformed", "the initial adapter has no tensors")
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise AdapterError("wrong_dtype", f"{name}: adapter tensors must be floating point, got {tensor.dtype}")
    check_finite(state)
    return state
