"""Content-addressed adapter files: `<root>/<sha256[:2]>/<sha256>.safetensors`.

A blob is durable before any row names it: the bytes are written to a temporary file,
fsynced, renamed into place, and the directory is fsynced. Blobs are deleted only after
the commit that stops referencing them; a crash in between leaves an orphan that
`sweep` removes later (never a row pointing at a missing file).

Uploads arrive as a `Receiver`: each chunk is hashed and appended to a temporary file in
`<root>/incoming/` (the same filesystem, so accepting it is a rename, never a copy); the
result, a `Staged` file, is `sync`ed before the engine lock and `adopt`ed (renamed into
its content address) inside the transaction that accepts it, or `discard`ed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedsilo.adapters import sha256

INCOMING = "incoming"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Staged:
    """A received body: a temporary file in the store, its size and its sha256 (computed once)."""

    path: Path
    size: int
    sha256: str

    def read(self) -> bytes:
        return self.path.read_bytes()


class Receiver:
    """A body arriving in chunks: written to a temporary file and hashed as it goes."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(dir=folder, suffix=".tmp")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)  # releases the GIL for large chunks, as the write does
        self._file.write(chunk)
        self.size += len(chunk)

    def finish(self) -> Staged:
        self._file.close()
        return Staged(self.path, self.size, self._hash.hexdigest())

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Blobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / INCOMING).mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.safetensors"

    def put(self, data: bytes) -> str:
        """Store `data` durably; returns its sha256. Idempotent."""
        digest = sha256(data)
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(target)
        _fsync_dir(target.parent)
        return digest

    def receive(self) -> Receiver:
        """A temporary file for a body about to arrive (swept like any orphan if never adopted)."""
        return Receiver(self.root / INCOMING)

    def stage(self, data: bytes) -> Staged:
        """`data` as if it had arrived as a request body (for in-process callers)."""
        receiver = self.receive()
        receiver.write(data)
        return receiver.finish()

    def sync(self, staged: Staged) -> None:
        """Make a staged file's bytes durable (the costly part of `adopt`, done before any lock)."""
        fd = os.open(staged.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def adopt(self, staged: Staged) -> str:
        """Rename a `sync`ed staged file into its content address; returns the digest.

        No rewrite, no re-hash. An existing blob of the same content is replaced by the
        identical bytes, which also renews its age (see `sweep`) for the commit to come.
        """
        target = self.path(staged.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, target)
        _fsync_dir(target.parent)
        return staged.sha256

    @staticmethod
    def discard(staged: Staged) -> None:
        """Remove a staged file that will not be adopted (or was: then nothing is left to remove)."""
        staged.path.unlink(missing_ok=True)

    def get(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def sweep(self, referenced: Iterable[str], min_age_seconds: float) -> int:
        """Delete blobs (and temp files) no row references, older than `min_age_seconds`.

        The age guard keeps a blob written by a transaction still in flight (here or in a
        fenced-out process), and a body still arriving or waiting to be accepted, until
        that transaction has surely committed or failed.
        """
        keep = set(referenced)
        cutoff = time.time() - min_age_seconds
        removed = 0
        for path in self.root.glob("*/*"):
            digest = path.name.split(".", 1)[0]
            if digest in keep and not path.name.endswith(".tmp"):
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
