"""Run parse + indicators over every file under a directory and report.

    .venv/bin/python bench/parse_corpus.py /work/shared/corpus [--slowest 10]

Counts: parsed, ParseError by reason, crashes (any other exception, or
ParseError("internal_error"), which is the safety net catching a bug: both
must be 0), the slowest files and the total time. Per-file time is CPU time
(process_time), so a busy shared machine does not inflate it; wall time is
shown beside it. Exit status 1 on crashes or on files over --max-seconds.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest.indicators import extract_indicators  # noqa: E402
from ingest.parse import ParseError, parse_file  # noqa: E402
from ingest.sanitize import sanitize_html  # noqa: E402


def run_one(path: Path) -> tuple[str, str]:
    """Return (outcome, detail): outcome is parsed / parse_error / crash."""
    try:
        parsed = parse_file(path)
        extract_indicators(parsed)
        sanitize_html(parsed.evidence.html)
    except ParseError as exc:
        if exc.reason == "internal_error":
            return "crash", "".join(traceback.format_exception(exc.__cause__ or exc))
        return "parse_error", exc.reason
    except Exception as exc:  # noqa: BLE001 - counting crashes is the point
        return "crash", "".join(traceback.format_exception(exc))
    return "parsed", f"{len(parsed.defects)} defects"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--slowest", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=1.0)
    parser.add_argument("--show-errors", action="store_true", help="list every ParseError file")
    args = parser.parse_args()

    files = sorted(p for p in args.directory.rglob("*") if p.is_file())
    outcomes: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    timings: list[tuple[float, Path]] = []
    crashes: list[tuple[Path, str]] = []
    errors: list[tuple[Path, str]] = []
    with_defects = 0
    started = time.perf_counter()
    for path in files:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        outcome, detail = run_one(path)
        timings.append((time.process_time() - cpu0, time.perf_counter() - wall0, path))
        outcomes[outcome] += 1
        if outcome == "parse_error":
            reasons[detail] += 1
            errors.append((path, detail))
        elif outcome == "crash":
            crashes.append((path, detail))
        elif not detail.startswith("0 "):
            with_defects += 1
    total = time.perf_counter() - started
    cpu_total = sum(cpu for cpu, _, _ in timings)

    print(f"files: {len(files)}")
    print(f"parsed: {outcomes['parsed']} ({with_defects} with defects)")
    print(f"parse errors: {outcomes['parse_error']}")
    for reason, count in reasons.most_common():
        print(f"  {reason}: {count}")
    print(f"crashes: {outcomes['crash']}")
    for path, detail in crashes:
        print(f"--- {path}\n{detail}")
    if args.show_errors:
        for path, reason in errors:
            print(f"  {reason:12} {path}")
    timings.sort(reverse=True)
    print(f"slowest {args.slowest} (CPU / wall):")
    for cpu, wall, path in timings[:args.slowest]:
        print(f"  {cpu:6.3f}s / {wall:6.3f}s  {path.stat().st_size:>10} B  {path}")
    print(f"total time: {cpu_total:.2f}s CPU, {total:.2f}s wall")
    too_slow = [cpu for cpu, _, _ in timings if cpu > args.max_seconds]
    if too_slow:
        print(f"files slower than {args.max_seconds}s: {len(too_slow)}")
    return 1 if crashes or too_slow else 0


if __name__ == "__main__":
    sys.exit(main())
