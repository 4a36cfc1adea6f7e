"""Intake's benchmarks, all in one run, one markdown table (`make bench`).

    python bench/run.py                 full run (800 messages; about 5 minutes on 2 cores)
    python bench/run.py --quick         smoke run (60 messages, 5 MB only, fewer requests)
    python bench/run.py --n 1000        more messages
    python bench/run.py --corpus DIR    *.eml files from DIR instead of generated mail
    python bench/run.py --only ingest,memory,web

Prints the table and writes it to bench/results/latest.md (git-ignored).
Ratios are what to compare: every contender runs in the same run, on the
same folder, on the same machine, interleaved.
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time

import common
from common import RESULTS

TARGETS = {
    "e2e": 2.0,  # Intake end to end, 2 workers, >= 2x the naive baseline's msg/s
    "capture": 0.25,  # capture alone >= 25% of the raw bulk fetch
    "memory": 2.0,  # the worker's peak RSS over idle (capture, processing) <= 2x the message size
    "page_ms": 30.0,  # connections page p50 with 1,000 connections
    "fragment_ms": 5.0,  # protocol swap fragment p50
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=common.ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except Exception:
        return "?"


def _mib(b: float) -> str:
    return f"{b / 2 ** 20:.1f} MiB"


def _ok(met: bool) -> str:
    return "yes" if met else "**no**"


def report(ingest: dict | None, memory: list | None, web: dict | None, meta: dict) -> str:
    from bench_ingest import LABELS, summarize

    out = [f"# Intake benchmarks, {meta['date']}", "",
           f"Machine: {meta['machine']}. Code: {meta['git']}. Load average before / after: "
           f"{meta['load_before']} / {meta['load_after']}. Total time: {meta['elapsed']:.0f} s.", ""]
    checks = []
    if ingest:
        rates = summarize(ingest)
        naive, raw = rates.get("naive"), rates.get("raw")
        out += [f"## Ingest: {ingest['corpus']}", "",
                "Each contender fetches the same Dovecot folder (reset to unread before each run), in "
                "interleaved rounds; the best round counts (rounds: "
                + ", ".join(f"{c} {len(t)}" for c, t in ingest["times"].items()) + ").", "",
                "| Contender | Time | Messages/s | vs naive | vs raw bulk |", "|---|---:|---:|---:|---:|"]
        for c, rate in rates.items():
            best = min(ingest["times"][c])
            out.append(f"| {LABELS[c]} | {best:.2f} s | {rate:.1f} | "
                       f"{rate / naive:.2f}x | {rate / raw:.3f}x |" if naive and raw else
                       f"| {LABELS[c]} | {best:.2f} s | {rate:.1f} | | |")
        out.append("")
        if "e2e2" in rates and naive:
            r = rates["e2e2"] / naive
            checks.append(("End to end (2 workers) vs naive", f"≥ {TARGETS['e2e']:.0f}x", f"{r:.2f}x",
                           r >= TARGETS["e2e"]))
        if "capture" in rates and raw:
            r = rates["capture"] / raw
            checks.append(("Capture alone vs raw bulk fetch", f"≥ {TARGETS['capture']:.0%}", f"{r:.1%}",
                           r >= TARGETS["capture"]))
    if memory:
        out += ["## Memory: peak RSS over idle RSS, one message fetched over IMAP by a fresh process", "",
                "A worker both captures and processes, so its peak is the larger of the two steps "
                "(each measured in a fresh process).", "",
                "| Message | Capture | x size | Processing | x size | Worker peak | x size | Naive fetcher | x size |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in memory:
            size, worker = row["bytes"], max(row["intake"], row["process"])
            out.append(f"| {size / 1e6:.0f} MB | {_mib(row['intake'])} | {row['intake'] / size:.2f} | "
                       f"{_mib(row['process'])} | {row['process'] / size:.2f} | {_mib(worker)} | "
                       f"{worker / size:.2f} | {_mib(row['naive'])} | {row['naive'] / size:.2f} |")
        out.append("")
        worst = max(max(row["intake"], row["process"]) / row["bytes"] for row in memory)
        naive_worst = max(row["naive"] / row["bytes"] for row in memory)
        checks.append(("Worker peak RSS over idle (capture and processing)", f"≤ {TARGETS['memory']:.0f}x size",
                       f"{worst:.2f}x (naive {naive_worst:.1f}x)", worst <= TARGETS["memory"]))
    if web:
        out += [f"## Web: server time, Flask test client in-process, {web['connections']} connections in SQLite", "",
                "| Request | p50 | p95 | CPU p50 | Requests |", "|---|---:|---:|---:|---:|"]
        for key, label in (("page", "Connections page `/settings/connections/`"),
                           ("fragment", "Protocol swap `/settings/connections/fields?protocol=imap`")):
            r = web[key]
            out.append(f"| {label} | {r['p50'] * 1000:.1f} ms | {r['p95'] * 1000:.1f} ms | "
                       f"{r['cpu_p50'] * 1000:.1f} ms | {r['n']} |")
        out.append("")
        checks.append(("Connections page p50 (1,000 connections)", f"≤ {TARGETS['page_ms']:.0f} ms",
                       f"{web['page']['p50'] * 1000:.1f} ms", web["page"]["p50"] * 1000 <= TARGETS["page_ms"]))
        checks.append(("Protocol swap fragment p50", f"≤ {TARGETS['fragment_ms']:.0f} ms",
                       f"{web['fragment']['p50'] * 1000:.1f} ms",
                       web["fragment"]["p50"] * 1000 <= TARGETS["fragment_ms"]))
    if checks:
        out += ["## Targets", "", "| Target | Goal | Measured | Met |", "|---|---|---|---|"]
        out += [f"| {name} | {goal} | {got} | {_ok(met)} |" for name, goal, got, met in checks]
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fast smoke run")
    ap.add_argument("--n", type=int, help="messages in the ingest folder (default 800; --quick: 60)")
    ap.add_argument("--rounds", type=int, help="rounds of the fast ingest contenders (default 3; --quick: 1)")
    ap.add_argument("--corpus", help="a directory of *.eml files to use instead of generated mail")
    ap.add_argument("--only", default="ingest,memory,web")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    n = args.n or (60 if args.quick else 800)
    rounds = args.rounds or (1 if args.quick else 3)

    import bench_ingest
    import bench_memory
    import bench_web

    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": common.machine(),
            "git": _git(), "load_before": common.load_average()}
    t0 = time.monotonic()
    ingest = bench_ingest.run(n, rounds, args.corpus, log=_log) if "ingest" in parts else None
    memory = bench_memory.run((5,) if args.quick else bench_memory.SIZES_MB, log=_log) if "memory" in parts else None
    web = bench_web.run(1000, 10 if args.quick else 60, log=_log) if "web" in parts else None
    meta.update(elapsed=time.monotonic() - t0, load_after=common.load_average())
    text = report(ingest, memory, web, meta)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(text + "\n")
    print(text)
    _log(f"written to {RESULTS / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
