"""GET /healthz: what an operator (or a load balancer) checks."""
from __future__ import annotations

import time

from flask import Blueprint, jsonify
from rq import Worker

from models import db
from services import queue

bp = Blueprint("health", __name__)
HEARTBEAT_STALE_SECONDS = 30


@bp.get("/healthz")
def healthz():
    """Database, Redis, live workers and the scheduler's heartbeat as JSON."""
    out: dict = {}
    try:
        db.execute_sql("SELECT 1")
        out["database"] = "ok"
    except Exception as e:  # the point is to report, not to crash
        out["database"] = f"error: {e.__class__.__name__}"
    try:
        r = queue.connection()
        r.ping()
        out["redis"] = "ok"
        out["workers"] = len(Worker.all(connection=r))
        beat = r.get(queue.SCHEDULER_HEARTBEAT_KEY)
        age = time.time() - float(beat) if beat else None
        out["scheduler"] = {"last_heartbeat_seconds_ago": round(age, 1) if age is not None else None,
                            "alive": age is not None and age < HEARTBEAT_STALE_SECONDS}
    except Exception as e:
        out["redis"] = f"error: {e.__class__.__name__}"
        out["workers"] = 0
        out["scheduler"] = {"last_heartbeat_seconds_ago": None, "alive": False}
    healthy = out["database"] == "ok" and out["redis"] == "ok"
    out["status"] = "ok" if healthy else "degraded"
    return jsonify(out), 200 if healthy else 503
