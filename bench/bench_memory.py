"""Memory: peak RSS of a worker fetching and processing one large message over IMAP.

For each size (5, 25 and 50 MB), one message in its own Dovecot mailbox is
captured by a fresh subprocess: it imports and sets up everything first,
reads its idle RSS (VmRSS), then captures the message (Intake: capture()
with the IMAP connector into the raw store and database); the figure is
`ru_maxrss` at the end minus that idle RSS. The naive fetcher
(bench/naive_fetch.py) is measured the same way. Intake's processing of the
same stored message (parse, attachments, indicators, incident) is measured
in another fresh subprocess: a worker does both, so its peak is the larger.

    python bench/bench_memory.py [--sizes 5,25,50]
    python bench/bench_memory.py --child capture|process   (internal; config in the environment)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile

import common
import corpus
from common import PYTHON, Instance

SIZES_MB = (5, 25, 50)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_kb() -> int:
    """The RSS right now (idle, after imports and set-up)."""
    return _status_kb("VmRSS")


def _hwm_kb() -> int:
    """The kernel's high-water mark of this process image, to cross-check ru_maxrss."""
    return _status_kb("VmHWM")


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child(kind: str) -> None:
    """Runs in a fresh interpreter with INTAKE_* in the environment."""
    import settings
    from app import init_services
    from ingest.store import RawStore
    from models import EmailConnection, StoredMessage, db

    cfg = settings.load()
    init_services(cfg)
    store = RawStore(cfg["DATA_DIR"])
    conn_id = int(os.environ["BENCH_CONNECTION_ID"])
    if kind == "capture":
        from ingest.capture import capture
        from jobs.connect import open_session

        with db.connection_context():
            conn = EmailConnection.get_by_id(conn_id)
            session = open_session(conn.stored_values(), lambda step: None)
            idle = _rss_kb()
            with session.connector as c:
                result = capture(c, conn, store)
            peak = _peak_kb()
        out = {"idle_kb": idle, "peak_kb": peak, "hwm_kb": _hwm_kb(), "messages": result.stored,
               "ids": result.new_message_ids}
    else:
        from ingest.process import process

        mid = int(os.environ["BENCH_MESSAGE_ID"])
        with db.connection_context():
            StoredMessage.get_by_id(mid)
            idle = _rss_kb()
            outcome = process(mid, store)
            peak = _peak_kb()
        out = {"idle_kb": idle, "peak_kb": peak, "hwm_kb": _hwm_kb(), "outcome": outcome}
    print(json.dumps(out))


def _run_child(args: list[str], env: dict) -> dict:
    # Through a shell that forks (not execs) the child: Linux carries the
    # ru_maxrss of the process image an exec replaces over to the new program,
    # and a child spawned straight from this (large) process would start with
    # this process's peak as its own.
    proc = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", PYTHON, *args], cwd=common.ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["peak_kb"] - out["hwm_kb"] > 1024:
        raise RuntimeError(f"ru_maxrss ({out['peak_kb']} KiB) is above the process's own high-water mark "
                           f"({out['hwm_kb']} KiB): it was inherited, the figure would be wrong")
    return out


def measure(size_mb: int, server, redis_url: str, log=print) -> dict:
    raw = corpus.make_message_of_size(size_mb * 1_000_000)
    box = common.new_mailbox(server, [raw])
    size = len(raw)
    del raw
    row = {"size_mb": size_mb, "bytes": size}
    # Intake capture, then processing of what it stored.
    inst = Instance(redis_url, f"mem{size_mb}")
    try:
        inst.create_app()
        conn = inst.add_imap_connection(box)
        env = dict(inst.env(), BENCH_CONNECTION_ID=str(conn.id))
        cap = _run_child(["bench/bench_memory.py", "--child", "capture"], env)
        if cap["messages"] != 1:
            raise RuntimeError(f"capture stored {cap['messages']} messages")
        row["intake"] = (cap["peak_kb"] - cap["idle_kb"]) * 1024
        row["intake_idle"] = cap["idle_kb"] * 1024
        proc = _run_child(["bench/bench_memory.py", "--child", "process"],
                          dict(env, BENCH_MESSAGE_ID=str(cap["ids"][0])))
        row["process"] = (proc["peak_kb"] - proc["idle_kb"]) * 1024
        row["process_outcome"] = proc["outcome"]
    finally:
        inst.cleanup()
    # The naive fetcher on the same message (unread again).
    box.reset_unread()
    out = tempfile.mkdtemp(prefix="intake-bench-naive-mem-")
    try:
        naive = _run_child(["bench/naive_fetch.py", "--rss", box.host, str(box.port), box.user, box.password, out],
                           dict(os.environ))
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    row["naive"] = (naive["peak_kb"] - naive["idle_kb"]) * 1024
    log(f"  {size_mb:3d} MB: Intake capture +{row['intake'] / 2**20:.1f} MiB "
        f"({row['intake'] / size:.2f}x), processing +{row['process'] / 2**20:.1f} MiB "
        f"({row['process'] / size:.2f}x, {row['process_outcome']}), naive +{row['naive'] / 2**20:.1f} MiB "
        f"({row['naive'] / size:.2f}x)")
    return row


def run(sizes=SIZES_MB, log=print) -> list[dict]:
    log("memory: one message per size, each fetched by a fresh process")
    with common.dovecot() as server, common.embedded_redis() as redis_url:
        return [measure(s, server, redis_url, log) for s in sizes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=("capture", "process"))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES_MB)))
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    run(tuple(int(s) for s in args.sizes.split(",")))


if __name__ == "__main__":
    main()
