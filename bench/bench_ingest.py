"""Ingest throughput: one IMAP folder, every contender, messages per second.

Contenders, each on the same Dovecot folder reset to unread before it runs:

  raw bulk      imaplib `UID FETCH 1:* (BODY.PEEK[])`, parses nothing (the limit)
  naive         bench/naive_fetch.py: imaplib, one FETCH per message, stdlib email
  capture       Intake's fetch job alone (jobs.fetch.fetch, enqueue_processing=False):
                durable storage + database rows + mark read, no processing
  Intake 1w/2w  end to end with 1 and 2 real `worker.py` processes on an embedded
                Redis and a fresh SQLite database: time from enqueueing the fetch
                until every message is processed (an incident each)
  what-if       the same with 2 bench/simple_worker.py processes (RQ's SimpleWorker:
                no fork per job); not how Intake runs, a measurement for the lead

    python bench/bench_ingest.py [--n 800] [--rounds 3] [--corpus DIR] [--only raw,naive,...] [--quick]
"""
from __future__ import annotations

import argparse
import imaplib
import shutil
import tempfile
import time

import common  # noqa: F401  (puts the repository on sys.path)
import corpus
import naive_fetch
from common import Instance, Mailbox, Workers

CONTENDERS = ("raw", "naive", "capture", "e2e1", "e2e2", "e2e2s")
LABELS = {
    "raw": "Raw bulk `UID FETCH 1:* BODY.PEEK[]` (no parsing)",
    "naive": "Naive fetcher (imaplib, FETCH per message, stdlib email, file)",
    "capture": "Intake capture alone (durable store + DB + mark read)",
    "e2e1": "Intake end to end, 1 worker (capture + processing)",
    "e2e2": "Intake end to end, 2 workers (capture + processing)",
    "e2e2s": "What-if: end to end, 2 workers without a fork per job (bench/simple_worker.py)",
}
#: Cheap contenders run every round; the end-to-end runs (a minute or more each) only in
#: the first E2E_ROUNDS. The best round of each counts.
REPEATED = ("raw", "naive", "capture")
E2E_ROUNDS = 2


def run_raw(box: Mailbox, n: int) -> float:
    t0 = time.perf_counter()
    imap = imaplib.IMAP4(box.host, box.port)
    imap.login(box.user, box.password)
    imap.select("INBOX")
    _typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
    imap.logout()
    elapsed = time.perf_counter() - t0
    got = sum(1 for item in data if isinstance(item, tuple))
    if got != n:
        raise RuntimeError(f"raw bulk fetch returned {got} of {n} messages")
    return elapsed


def run_naive(box: Mailbox, n: int) -> float:
    out = tempfile.mkdtemp(prefix="intake-bench-naive-")
    try:
        t0 = time.perf_counter()
        got = naive_fetch.fetch_all(box.host, box.port, box.user, box.password, out)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if got != n or box.unseen():
        raise RuntimeError(f"naive fetch handled {got} of {n} messages")
    return elapsed


def run_capture(box: Mailbox, n: int, redis_url: str) -> float:
    from jobs import fetch
    from services import queue

    inst = Instance(redis_url, "capture")
    try:
        inst.create_app()
        conn = inst.add_imap_connection(box)
        queue.connection().flushdb()
        t0 = time.perf_counter()
        result = fetch.fetch(conn.id, enqueue_processing=False)
        elapsed = time.perf_counter() - t0
        if result.get("stored") != n or box.unseen():
            raise RuntimeError(f"capture stored {result} of {n} messages")
        return elapsed
    finally:
        inst.cleanup()


def run_e2e(box: Mailbox, n: int, redis_url: str, workers: int, timeout: float = 900,
            script: str = "worker.py") -> float:
    from jobs import fetch
    from models import Incident, StoredMessage, db
    from services import queue

    inst = Instance(redis_url, f"e2e{workers}")
    try:
        inst.create_app()
        conn = inst.add_imap_connection(box)
        queue.connection().flushdb()
        with Workers(inst, workers, script):
            t0 = time.perf_counter()
            fetch.enqueue(conn.id)
            deadline = t0 + timeout
            with db.connection_context():
                while True:
                    done = (StoredMessage.select().where(StoredMessage.state.in_(("processed", "quarantined")))
                            .count())
                    if done >= n:
                        break
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"only {done} of {n} messages processed after {timeout:.0f} s; "
                                           f"see {inst.config['LOG_FILE']}")
                    time.sleep(0.02)
            elapsed = time.perf_counter() - t0
        with db.connection_context():
            quarantined = StoredMessage.select().where(StoredMessage.state == "quarantined").count()
            incidents = Incident.select().count()
        if quarantined or incidents != n or box.unseen():
            raise RuntimeError(f"end to end: {quarantined} quarantined, {incidents} incidents for {n} messages")
        return elapsed
    finally:
        inst.cleanup()


def run(n: int = 800, rounds: int = 3, corpus_dir: str | None = None, only=CONTENDERS, log=print) -> dict:
    """Returns {"corpus": description, "n": n, "times": {contender: [seconds per round]}}."""
    msgs = corpus.load_dir(corpus_dir, n) if corpus_dir else corpus.generate(n)
    n = len(msgs)
    desc = corpus.describe(msgs)
    log(f"ingest: {desc}")
    times: dict[str, list[float]] = {c: [] for c in only}
    with common.dovecot() as server, common.embedded_redis() as redis_url:
        from app import init_services  # noqa: F401  (imports the app before timing anything)

        box = common.new_mailbox(server, msgs)
        del msgs
        for r in range(rounds):
            for c in only:  # interleaved, so a burst of load elsewhere hits every contender alike
                if r >= E2E_ROUNDS and c not in REPEATED:
                    continue
                box.reset_unread()
                if c == "raw":
                    t = run_raw(box, n)
                elif c == "naive":
                    t = run_naive(box, n)
                elif c == "capture":
                    t = run_capture(box, n, redis_url)
                elif c == "e2e2s":
                    t = run_e2e(box, n, redis_url, workers=2, script="bench/simple_worker.py")
                else:
                    t = run_e2e(box, n, redis_url, workers=int(c[-1]))
                times[c].append(t)
                log(f"  round {r + 1}: {c:8s} {t:7.2f} s  {n / t:8.1f} msg/s  (load {common.load_average()})")
    return {"corpus": desc, "n": n, "times": times}


def summarize(res: dict) -> dict:
    """Best round per contender (least disturbed by other load) as msg/s."""
    n = res["n"]
    return {c: n / min(ts) for c, ts in res["times"].items() if ts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the cheap contenders (raw, naive, capture)")
    ap.add_argument("--corpus")
    ap.add_argument("--only", default=",".join(CONTENDERS))
    ap.add_argument("--quick", action="store_true", help="100 messages, one round")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 60, 1
    res = run(args.n, args.rounds, args.corpus, tuple(args.only.split(",")))
    for c, rate in summarize(res).items():
        print(f"{LABELS[c]:70s} {rate:8.1f} msg/s")


if __name__ == "__main__":
    main()
