"""Durable, content-addressed storage of raw email.

A message is streamed to a temporary file while its SHA-256 is computed,
fsync'd, then renamed to `raw/ab/cd/<sha256>.eml`. Rename is atomic, so a
file under `raw/` is always complete; a crash leaves at most a temporary
file, and the same message fetched again lands on the same name."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class HashingWriter:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._f.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._f.flush()


class RawStore:
    def __init__(self, data_dir: str | os.PathLike):
        self.root = Path(data_dir)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def open(self, rel: str):
        return open(self.path(rel), "rb")

    def begin(self) -> "PendingRaw":
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        return PendingRaw(self, os.fdopen(fd, "wb", buffering=1024 * 1024), Path(name))

    def rel_for(self, sha: str, suffix: str = ".eml") -> str:
        return f"raw/{sha[:2]}/{sha[2:4]}/{sha}{suffix}"

    def put_bytes(self, data: bytes, kind: str = "raw", suffix: str = ".bin") -> tuple[str, str]:
        """Store small content (attachments) by hash; returns (rel path, sha256)."""
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{kind}/{sha[:2]}/{sha[2:4]}/{sha}{suffix}"
        target = self.path(rel)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, target)
        return rel, sha


class PendingRaw:
    def __init__(self, store: RawStore, f, tmp_path: Path):
        self.store, self._f, self._tmp = store, f, tmp_path
        self.writer = HashingWriter(f)
        self.rel = ""

    @property
    def size(self) -> int:
        return self.writer.size

    @property
    def sha256(self) -> str:
        return self.writer.sha256.hexdigest()

    def commit(self) -> str:
        """Make the file durable under its content address."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        rel = self.store.rel_for(self.sha256)
        target = self.store.path(rel)
        if target.exists():
            self._tmp.unlink(missing_ok=True)  # the same bytes are already stored
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp, target)
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself must survive a power cut
            finally:
                os.close(dir_fd)
        self.rel = rel
        return rel

    def discard(self) -> None:
        try:
            self._f.close()
        finally:
            self._tmp.unlink(missing_ok=True)
