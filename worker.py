"""Background processes.

  python worker.py             an RQ worker (with RQ's scheduler) on Intake's queues
  python worker.py scheduler   Intake's scheduler: heartbeat and due fetches
"""
from __future__ import annotations

import logging
import sys

import settings
from app import init_services
from services import queue

log = logging.getLogger("intake.worker")


def main(argv: list[str]) -> int:
    cfg = settings.load()
    init_services(cfg)
    if not cfg["REDIS_URL"]:
        queue.wait_for(cfg["REDIS_SOCKET"], timeout=30)
    if argv[1:2] == ["scheduler"]:
        from jobs.scheduler import run_forever
        run_forever()
        return 0
    from rq import Worker

    # RQ runs each job in a forked child: import the jobs and every
    # connector here, once, not in every child (0.1-0.3 s per job otherwise,
    # about 0.8 s for exchangelib).
    import connectors.ews, connectors.graph, connectors.imap  # noqa: E401,F401
    import jobs.connection_test, jobs.fetch, jobs.oauth_grant, jobs.process  # noqa: E401,F401

    names = argv[1:] or list(queue.QUEUE_NAMES)
    worker = Worker([queue.queue(n) for n in names], connection=queue.connection())
    log.info("Worker listening on %s", ", ".join(names))
    worker.work(with_scheduler=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
