"""Durable, content-addressed storage of raw email.

A message is written to a temporary file (streamed into tmp/ while its
content hash is computed, or, when all its bytes are at hand, hashed first
and written next to its final name as `.<hash prefix>.<pid>.<n>.part`),
fsync'd, then renamed to `raw/ab/<hash>.eml` and its directory fsync'd.
Rename is atomic, so a `<hash>.eml` file is always complete; a crash leaves
at most a temporary `.part` file, and the same message fetched again lands
on the same name.

The content hash of a message (`content_hash`) is BLAKE3: it names the
file and finds the same bytes fetched again, and nothing else. Capture
hashes every byte it fetches before anything else can happen to it, and
BLAKE3 (SIMD, 256-bit) does that three to four times faster than SHA-256
even with the CPU's SHA extensions: SHA-256 was a third of the fetching
thread's CPU.
Messages stored before 2026-11 are named by their SHA-256; rows name their
files, so they stay where they are. The SHA-256 users see (of attachments,
which are stored by it, and of the raw message) is computed by processing.

One level of 256 shards (`shard_rel`), as git lays out its objects: a
second level (`raw/ab/cd/`, the layout before 2026-11) made a young store
create a directory for almost every message, and creating a directory (a
new inode placed by the Orlov allocator, and its parent's entry to fsync)
cost more than writing the message. ext4's hashed directories look a name
up in O(log n), so a shard of tens of thousands of files is no slower.
raw/'s shards are made with the store; att/'s as needed (processing).
Files stored under the old layout stay where they are: rows name their
path, and nothing else looks for them there."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import queue
import sys
import tempfile
import threading
from pathlib import Path

from blake3 import blake3


def content_hash(data) -> str:
    """The hex digest that names a raw message (see the module's docstring)."""
    return blake3(data).hexdigest()


def content_hasher():
    """For a message that arrives in pieces: update(), then hexdigest()."""
    return blake3()


def shard_rel(kind: str, digest: str, suffix: str) -> str:
    """Where content with this hex digest is stored, relative to the store's
    root: one level of 256 shards (see the module's docstring)."""
    return f"{kind}/{digest[:2]}/{digest}{suffix}"


class _CountingWriter:
    """A write-only file that counts what passes through.

    Unbuffered: bodies arrive in pieces of many kilobytes, so each write
    goes straight to the kernel; a buffer would only copy them once more."""

    def __init__(self, f):
        self._f = f
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        n = len(view)
        while view:  # a raw write may take less than asked
            view = view[self._f.write(view):]
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()


class HashingWriter(_CountingWriter):
    """A write-only file that hashes (`content_hasher`) and counts what
    passes through."""

    def __init__(self, f):
        super().__init__(f)
        self.hasher = content_hasher()

    def write(self, data) -> int:
        n = super().write(data)
        self.hasher.update(data)
        return n


class _RawFile:
    """An unbuffered, write-only file on a descriptor: what PendingRaw uses
    of a file. Lighter to make than os.fdopen's FileIO (a thousand a run)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        return os.write(self.fd, data)

    def flush(self) -> None:
        pass  # nothing buffered

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class RawStore:
    def __init__(self, data_dir: str | os.PathLike):
        self.root = Path(data_dir)
        self._root = str(self.root)  # for building paths cheaply, thousands of times a run
        self.tmp = self.root / "tmp"
        if not self.tmp.is_dir():
            self._create()

    def _create(self) -> None:
        """A new store: tmp/ and raw/ with its 256 shards, spread out over
        the disk (`_spread_out`). Made now rather than by the first messages
        that need them: a young store's capture then costs what a used
        one's does (a directory cost more to make than a message to write)."""
        self.root.mkdir(parents=True, exist_ok=True)
        _spread_out(self.root)
        raw = self.root / "raw"
        raw.mkdir(exist_ok=True)
        _spread_out(raw)
        for i in range(256):
            (raw / f"{i:02x}").mkdir(exist_ok=True)
        _fsync_dir(raw)
        self.tmp.mkdir(exist_ok=True)
        _fsync_dir(self.root)  # their entries, before anything is stored under them

    def path(self, rel: str) -> Path:
        return self.root / rel

    def open(self, rel: str):
        return open(self.path(rel), "rb")

    def begin(self, hashed_by_caller: bool = False) -> "PendingRaw":
        """A message to be streamed (written in pieces, hashed on the way
        unless the caller hashes it and says so with `finish(digest)`): its
        temporary file is in tmp/."""
        fd, name = _create_temp(str(self.tmp))
        f = _RawFile(fd)
        return PendingRaw(self, f, name, writer=_CountingWriter(f) if hashed_by_caller else None)

    def begin_whole(self, data, digest: str | None = None) -> "PendingRaw":
        """A message whose bytes are all at hand (most are): hashed first
        (`digest`: its content_hash, if the caller has it), so its temporary file is
        created in the directory it will be renamed in, among the spread-out
        shards rather than in the one tmp/ (see `_spread_out`). Durable,
        like `begin()`'s, only once committed.

        It does not look for the same bytes stored before: that look (a
        stat per message) cost capture more than writing the rare
        re-delivered message again, and renaming over a stored copy puts the
        same complete bytes in place. The rows find duplicates (capture
        looks the content hash up before recording a message)."""
        digest = digest or content_hash(data)
        parent = f"{self._root}/{shard_rel('raw', digest, '.eml')}".rpartition("/")[0]
        try:
            fd, name = _create_temp(parent, "." + digest[:16])
        except FileNotFoundError:  # a store made before its shards were made up front
            os.makedirs(parent, exist_ok=True)
            fd, name = _create_temp(parent, "." + digest[:16])
        pending = PendingRaw(self, _RawFile(fd), name, digest=digest, size=len(data), rename_over=True)
        try:
            pending._write_all(data)
        except BaseException:
            pending.discard()
            raise
        return pending

    def commit_many(self, pendings: list["PendingRaw"], pool=None) -> None:
        """Group commit: each file gets the same guarantee as `PendingRaw.commit`
        (fsync'd, renamed to its content address, directory fsync'd) with far
        fewer waits. The fsyncs run concurrently (on `pool` if given), so the
        file system joins them into a few journal commits, and each
        directory is synced once. Nothing is durable (no `rel` set) until all
        of it is."""
        if len(pendings) <= 1 and pool is None:
            for p in pendings:
                p.commit()
            return
        own = pool is None
        pool = pool or SyncPool(min(8, len(pendings)))
        try:
            pool.run_all(PendingRaw.sync, [p for p in pendings if not p.synced])
            rels, dirs = [], set()
            for p in pendings:
                rel = self.rel_for(p.digest)
                dirs.add(p._place(rel))
                rels.append(rel)
            # The renames themselves must survive a power cut. A task per
            # thread, not per directory: as many in flight, less overhead.
            dirs = sorted(dirs)
            pool.run_all(_fsync_dirs, [dirs[i::pool.threads] for i in range(min(pool.threads, len(dirs)))])
        finally:
            if own:
                pool.close()
        for p, rel in zip(pendings, rels):
            p.rel = rel

    def rel_for(self, digest: str, suffix: str = ".eml") -> str:
        return shard_rel("raw", digest, suffix)

    def put_bytes(self, data: bytes, kind: str = "raw", suffix: str = ".bin", *,
                  sha: str | None = None) -> tuple[str, str]:
        """Store small content (attachments) by hash; returns (rel path, sha256).
        `sha`: the SHA-256 hex digest when the caller already has it (parsing
        hashes every attachment), so large attachments are not hashed twice."""
        sha = sha or hashlib.sha256(data).hexdigest()
        rel = shard_rel(kind, sha, suffix)
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
    """A message on its way into the store: a temporary file, durable under
    `rel` once committed."""

    def __init__(self, store: RawStore, f, tmp_path: str, *, digest: str | None = None, size: int = 0,
                 rename_over: bool = False, writer=None):
        self.store, self._f, self._tmp = store, f, tmp_path
        # For streaming into it (begin).
        self.writer = writer or (HashingWriter(f) if digest is None else None)
        self._digest, self._size = digest, size  # known up front (begin_whole)
        # Rename over a stored copy of the same bytes rather than look for one first (begin_whole).
        self._rename_over = rename_over
        self.rel = ""
        self.synced = False

    @property
    def size(self) -> int:
        return self._size if self._digest is not None else self.writer.size

    @property
    def digest(self) -> str:
        """Its content_hash."""
        return self._digest if self._digest is not None else self.writer.hasher.hexdigest()

    def finish(self, digest: str) -> None:
        """The content_hash of what was streamed in, computed by the caller."""
        self._digest, self._size = digest, self.writer.size

    def _write_all(self, data) -> None:
        _CountingWriter(self._f).write(data)

    def sync(self) -> None:
        """fsync the complete file's data. `commit`/`commit_many` do it
        anyway; calling it earlier (on another thread, as soon as the file
        is complete) leaves them less to wait for."""
        if not self.synced:
            self._f.flush()
            _sync_data(self._f.fileno())
            self.synced = True

    def commit(self) -> str:
        """Make the file durable under its content address."""
        self.sync()
        rel = self.store.rel_for(self.digest)
        _fsync_dir(self._place(rel))  # the rename itself must survive a power cut
        self.rel = rel
        return rel

    def _place(self, rel: str) -> str:
        """Rename the synced temporary file to `rel`; returns the directory
        whose entry changed and must be fsync'd."""
        self._f.close()
        target = f"{self.store._root}/{rel}"
        parent = target.rpartition("/")[0]
        if not self._rename_over and os.path.exists(target):
            # The same bytes are already stored. Sync its directory anyway:
            # a run that stopped between its rename and that sync left an
            # entry that may not be on disk yet.
            os.unlink(self._tmp)
            return parent
        try:
            os.replace(self._tmp, target)
        except FileNotFoundError:
            if not os.path.exists(self._tmp):
                raise
            os.makedirs(parent, exist_ok=True)  # the first file under this prefix
            os.replace(self._tmp, target)
        return parent

    def discard(self) -> None:
        try:
            self._f.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)


class PutGroup:
    """Content stored by hash as `RawStore.put_bytes` stores it, made durable
    as a group: `put` writes each file next to its content address, `commit`
    fsyncs them all at once (concurrently, so the file system joins them into
    a few journal commits rather than one per file), renames them into place
    and fsyncs each directory once. put_bytes waits for an fsync per file.

    A file is durable under the rel `put` returned only once `commit` has
    returned without an error for it: a database row naming it must not
    commit before. Files are closed as soon as they are written (a group may
    hold thousands); `commit` reopens them to sync them."""

    #: fsyncs in flight when commit makes its own pool. A batch's ~20 files
    #: took about as long with 4 as with 8, and each thread costs CPU to
    #: start (a pool per batch: processing jobs are forked children).
    SYNC_THREADS = 4

    def __init__(self, store: RawStore, kind: str = "raw", suffix: str = ".bin"):
        self.store, self.kind, self.suffix = store, kind, suffix
        self._files: dict[str, str | None] = {}  # rel: its temporary file, or None when already stored
        # Directories whose entries changed besides the files' own ones: the
        # parents of directories created for this group.
        self._dirs: set[str] = set()

    def put(self, data, *, sha: str | None = None) -> str:
        """Write `data` (not durable yet); returns its rel, as put_bytes
        would. `sha`: its SHA-256 hex digest, when the caller has it."""
        sha = sha or hashlib.sha256(data).hexdigest()
        rel = shard_rel(self.kind, sha, self.suffix)
        if rel in self._files:
            return rel  # the same bytes, earlier in the group
        target = f"{self.store._root}/{rel}"
        parent = target.rpartition("/")[0]
        if os.path.exists(target):
            # Stored before (a file is renamed into place only once synced).
            # Its directory is still synced at commit, as begin_whole's.
            self._files[rel] = None
            return rel
        try:
            fd, name = _create_temp(parent, "." + sha[:16])
        except FileNotFoundError:  # the first file under this prefix
            self._make_dirs(parent)
            fd, name = _create_temp(parent, "." + sha[:16])
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                _CountingWriter(f).write(data)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise
        self._files[rel] = name
        return rel

    def _make_dirs(self, path: str) -> None:
        """The missing directories down to `path`; their parents' entries
        changed, and are synced at commit."""
        missing = []
        while path != self.store._root and not os.path.isdir(path):
            missing.append(path)
            path = path.rpartition("/")[0]
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:  # made by another worker meanwhile: synced all the same
                pass
            else:
                if d == f"{self.store._root}/{self.kind}":
                    # As raw/: its shards in block groups of their own (creating
                    # a batch's files in new shards cost half as much CPU).
                    _spread_out(d)
            self._dirs.add(d.rpartition("/")[0])

    def commit(self, pool: "SyncPool | None" = None) -> dict[str, BaseException]:
        """Make every file put since the last commit durable. Returns {rel:
        error} for those that could not be (nothing durable to name), empty
        when all are: one file's error does not fail the others."""
        files, self._files = self._files, {}
        dirs, self._dirs = self._dirs, set()
        written = [(rel, tmp) for rel, tmp in files.items() if tmp is not None]
        errors: dict[str, BaseException] = {}  # rel: why it is not durable
        failed_dirs: dict[str, BaseException] = {}

        def sync(item) -> None:
            rel, tmp = item
            try:
                _sync_path(tmp)
            except OSError as e:
                errors[rel] = e

        def sync_dir(path) -> None:
            try:
                _fsync_dir(path)
            except OSError as e:
                failed_dirs[path] = e

        own = pool is None and len(written) > 1
        if own:
            pool = SyncPool(min(self.SYNC_THREADS, len(written)))
        try:
            if pool is None:
                for item in written:
                    sync(item)
            else:
                pool.run_all(sync, written)
            for rel, tmp in written:
                if rel in errors:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    continue
                try:
                    os.replace(tmp, f"{self.store._root}/{rel}")
                except OSError as e:
                    errors[rel] = e
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            # The renames (and the directories made for them) must survive a power cut.
            dirs.update(f"{self.store._root}/{rel}".rpartition("/")[0] for rel in files if rel not in errors)
            if pool is None or len(dirs) <= 1:
                for d in dirs:
                    sync_dir(d)
            else:
                pool.run_all(sync_dir, sorted(dirs))
        finally:
            if own:
                pool.close()
        if failed_dirs:
            for rel in files:
                path = f"{self.store._root}/{rel}"
                for d, e in failed_dirs.items():
                    if path.startswith(d + "/"):
                        errors.setdefault(rel, e)
        return errors

    def discard(self) -> None:
        """Remove the temporary files of everything not committed."""
        files, self._files, self._dirs = self._files, {}, set()
        for tmp in files.values():
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


def _spread_out(path) -> None:
    """Ask ext2/3/4 to place this directory's subdirectories in block groups
    of their own, away from it (the Orlov allocator's "top directory" flag,
    `chattr +T`, meant for roots of unrelated trees like these shards).

    By default a subdirectory, and then every file created in it, is placed
    in its parent's block group, so the whole store competes for inodes with
    whatever else churns there. On ext4 without a journal the allocator skips
    every inode freed in the last minutes one by one: under a busy /tmp a
    file or directory creation cost 0.2-0.6 ms instead of 0.01-0.05 ms, and
    the ~2 inodes per new message were most of capture's time. Best effort:
    other file systems lack the flag, and nothing depends on it."""
    if not sys.platform.startswith("linux"):
        return
    import array
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        flags = array.array("i", [0])  # the kernel reads an int, whatever the ioctl's declared size
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & _FS_TOPDIR_FL:
            flags[0] |= _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags)
    except OSError:  # not ext2/3/4 (ENOTTY, EOPNOTSUPP...), or not ours to change
        pass
    finally:
        os.close(fd)


# linux/fs.h
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(paths) -> None:
    for path in paths:
        _fsync_dir(path)


#: fdatasync where there is one: it writes the data and what is needed to read
#: it back (size, blocks), skipping timestamps; the rename is synced apart.
_sync_data = getattr(os, "fdatasync", os.fsync)


def _sync_path(path: str) -> None:
    """fdatasync a closed file. Linux reports a writeback error to the
    next fsync of the file even on a descriptor opened after it (4.16+)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _sync_data(fd)
    finally:
        os.close(fd)


_temp_names = itertools.count()


def _create_temp(directory: str, prefix: str = "") -> tuple[int, str]:
    """A new, empty temporary file (fd, path) in `directory`: named by this
    process and a counter rather than tempfile's random names, which cost
    more than creating the file."""
    while True:
        name = f"{directory}/{prefix}.{os.getpid()}.{next(_temp_names)}.part"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), name
        except FileExistsError:  # left by a killed process whose pid this one got
            continue


class SyncPool:
    """A few threads that run fsyncs (which release the GIL), so many are in
    flight at once and the device serves them together. Lighter than a
    ThreadPoolExecutor: a capture runs thousands of fsyncs, and a Future
    each cost more CPU than the fsync."""

    def __init__(self, threads: int = 8):
        self.threads = threads
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"store-fsync-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def run(self, fn, item, countdown: "Countdown") -> None:
        """fn(item) on a pool thread; `countdown` counts it until it ends."""
        countdown.add()
        self._tasks.put((fn, item, countdown))

    def run_all(self, fn, items) -> None:
        """fn(item) for each item, concurrently; waits for all of them, then
        raises the first error."""
        countdown = Countdown()
        for item in items:
            self.run(fn, item, countdown)
        countdown.wait()

    def close(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, item, countdown = task
            try:
                fn(item)
            except BaseException as e:
                countdown.finish(e)
            else:
                countdown.finish(None)


class Countdown:
    """Tasks started on a SyncPool and not yet finished."""

    def __init__(self):
        self._left = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition(threading.Lock())

    def add(self) -> None:
        with self._cond:
            self._left += 1

    def finish(self, error: BaseException | None) -> None:
        with self._cond:
            self._error = self._error or error
            self._left -= 1
            if not self._left:
                self._cond.notify_all()

    def wait(self, raise_error: bool = True) -> None:
        """Until every task counted so far has finished; then raises the
        first error among them."""
        with self._cond:
            while self._left:
                self._cond.wait()
        if raise_error and self._error is not None:
            raise self._error
