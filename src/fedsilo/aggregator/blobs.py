"""Content-addressed adapter files: `<root>/<sha256[:2]>/<sha256>.safetensors`.

A blob is durable before any row names it: the bytes are written to a temporary file,
fsynced, renamed into place, and the directory is fsynced. Blobs are deleted only after
the commit that stops referencing them; a crash in between leaves an orphan that
`sweep` removes later (never a row pointing at a missing file).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from fedsilo.adapters import sha256


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Blobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

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

    def get(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def sweep(self, referenced: Iterable[str], min_age_seconds: float) -> int:
        """Delete blobs (and temp files) no row references, older than `min_age_seconds`.

        The age guard keeps a blob written by a transaction still in flight (here or in a
        fenced-out process) until that transaction has surely committed or failed.
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
