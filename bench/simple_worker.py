"""What-if only: worker.py's queues served by RQ's SimpleWorker, which runs
each job in the worker process itself instead of a forked child per job.

With one job per message, the fork (and the copy-on-write faults of the
child touching the parent's memory) plus RQ's per-job bookkeeping cost more
than processing a typical message. The benchmark runs this as a labelled
what-if row next to the real `worker.py`; it is not how Intake runs. A
worker without fork loses RQ's per-job hard time-out and crash isolation,
which is why this is a measurement, not a change.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import settings
    from app import init_services
    from services import queue

    cfg = settings.load()
    init_services(cfg)
    from rq import SimpleWorker

    import jobs.fetch  # noqa: F401
    import jobs.process  # noqa: F401

    worker = SimpleWorker([queue.queue(n) for n in queue.QUEUE_NAMES], connection=queue.connection())
    worker.work(with_scheduler=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
