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

    def commit_many(self, pendings: list["PendingRaw"]) -> None:
        """Group commit: each file gets the same guarantee as `PendingRaw.commit`
        (fsync'd, renamed to its content address, directory fsync'd) with far
        fewer waits. The fsyncs run concurrently, so the file system joins
        them into a few journal commits, and each directory is synced once.
        Nothing is durable (no `rel` set) until all of it is."""
        if len(pendings) <= 1:
            for p in pendings:
                p.commit()
            return
        for p in pendings:
            p._f.flush()
        _concurrently(lambda p: os.fsync(p._f.fileno()), pendings)
        rels, dirs = [], set()
        for p in pendings:
            p._f.close()
            rel = self.rel_for(p.sha256)
            target = self.path(rel)
            if target.exists():
                p._tmp.unlink(missing_ok=True)  # the same bytes are already stored
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p._tmp, target)
                dirs.add(target.parent)
            rels.append(rel)
        _concurrently(_fsync_dir, dirs)  # the renames themselves must survive a power cut
        for p, rel in zip(pendings, rels):
            p.rel = rel

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
            _fsync_dir(target.parent)  # the rename itself must survive a power cut
        self.rel = rel
        return rel

    def discard(self) -> None:
        try:
            self._f.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _concurrently(fn, items, threads: int = 8) -> None:
    """fn(item) for each item on a few threads (fsync releases the GIL);
    the first error is raised after all have finished."""
    items = list(items)
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
    for f in futures:
        f.result()
