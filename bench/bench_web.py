"""Web: server time of the connections page with 1,000 connections, and of
the Protocol swap fragment.

In-process, through Flask's test client signed in as an organization admin,
against a fresh SQLite database seeded with 1,000 realistic connections
(every protocol, statuses, errors, encrypted secrets). Each request is timed
around `client.get` (routing, auth, queries, template rendering: everything
the server does, no network), after a few warm-up requests.

    python bench/bench_web.py [--connections 1000] [--requests 60]
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import re
import statistics
import time

import common
from common import Instance

PAGE = "/settings/connections/"
FRAGMENT = "/settings/connections/fields?protocol=imap"
EMAIL, PASSWORD = "bench-admin@example.com", "correct horse battery staple"


def seed(n: int, seed_value: int = 3):
    """An organization with an admin and `n` connections; returns the org."""
    from models import EmailConnection, Membership, Organization, User, db, utcnow

    r = random.Random(seed_value)
    now = utcnow()
    with db.connection_context():
        org = Organization.create(name="Bench Org")
        user = User(email=EMAIL)
        user.set_password(PASSWORD)
        user.save()
        Membership.create(user=user, organization=org, is_admin=True)
        rows = []
        for i in range(n):
            protocol = r.choice(("imap", "imap", "exchange", "oauth", "graph"))
            status = r.choice(("ok", "ok", "ok", "failing", "never", "paused", "grant"))
            region = r.choice(("EU", "US", "APAC", "HQ", "Legal", "Finance"))
            row = dict(
                organization=org, name=f"Phishing reports {region} {i:04d}", api_name=f"Phishing_{region}_{i:04d}",
                description=f"Reports from the {region} office", protocol=protocol,
                email_address=f"phish-{i}@{region.lower()}.example.com", source_folder=r.choice(("", "Inbox/Phishing")),
                enabled=r.random() > 0.1, status=status, fetch_interval=r.choice((60, 300, 900)),
                routing=r.choice(("incident", "case", "inbox")),
                last_test_at=now - dt.timedelta(minutes=r.randrange(60 * 24 * 30)),
                last_fetch_at=None if status == "never" else now - dt.timedelta(seconds=r.randrange(3600)),
                next_fetch_at=now + dt.timedelta(seconds=r.randrange(900)),
                messages_total=r.randrange(50_000), messages_last_run=r.randrange(40),
                consecutive_failures=3 if status == "failing" else 0,
                last_error=("The IMAP server rejected the email address or password for "
                            f"phish-{i}@{region.lower()}.example.com." if status == "failing" else ""),
                last_error_code="auth_failed" if status == "failing" else "",
            )
            if protocol == "imap":
                row.update(host=f"imap.{region.lower()}.example.com", port=993, encryption="ssl",
                           password=f"secret-{i}-{r.randrange(10 ** 9)}")
            elif protocol == "exchange":
                row.update(endpoint=f"https://mail.{region.lower()}.example.com/EWS/Exchange.asmx",
                           password=f"secret-{i}-{r.randrange(10 ** 9)}")
            else:
                row.update(oauth_client_id=f"{r.randrange(16 ** 32):032x}", oauth_tenant_id="example.onmicrosoft.com",
                           oauth_client_secret=f"cs-{r.randrange(10 ** 12)}",
                           oauth_token_cache='{"AccessToken": {}, "RefreshToken": {}}',
                           oauth_account_username=f"admin@{region.lower()}.example.com")
            rows.append(row)
        with db.atomic():
            for row in rows:
                EmailConnection.create(**row)
    return org


def signed_in_client(app):
    client = app.test_client()
    html = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
    resp = client.post("/login", data={"email": EMAIL, "password": PASSWORD, "csrf_token": token})
    if resp.status_code != 302:
        raise RuntimeError(f"sign-in failed: {resp.status_code}")
    return client


def time_requests(client, path: str, n: int, warmup: int = 5, headers=None, check=None):
    """Wall-clock and CPU seconds of each request (CPU: this process only,
    which is the server here; less disturbed by other load on the machine)."""
    wall, cpu = [], []
    for i in range(warmup + n):
        c0, t0 = time.process_time(), time.perf_counter()
        resp = client.get(path, headers=headers or {})
        body = resp.get_data()
        elapsed, used = time.perf_counter() - t0, time.process_time() - c0
        if resp.status_code != 200:
            raise RuntimeError(f"GET {path}: {resp.status_code}")
        if check is not None and i == 0:
            check(body.decode())
        if i >= warmup:
            wall.append(elapsed)
            cpu.append(used)
    return wall, cpu


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run(connections: int = 1000, requests: int = 60, log=print) -> dict:
    log(f"web: {connections} connections, {requests} timed requests per URL (in-process test client)")
    with common.embedded_redis() as redis_url:
        inst = Instance(redis_url, "web")
        try:
            app = inst.create_app()
            seed(connections)
            client = signed_in_client(app)

            from views.connections import PER_PAGE

            def page_ok(html: str) -> None:
                # The list is paged: the first page of the organization's 1,000.
                rows = html.count('<tr id="connection-')
                if rows != min(connections, PER_PAGE) or f"({connections} connections)" not in html and connections > PER_PAGE:
                    raise RuntimeError(f"the page shows {rows} connections, not the first {PER_PAGE} of {connections}")

            def fragment_ok(html: str) -> None:
                if "<html" in html or ">Host Name</label>" not in html:
                    raise RuntimeError("the fragment is not the IMAP field group")

            page = time_requests(client, PAGE, requests, check=page_ok)
            fragment = time_requests(client, FRAGMENT, requests * 5, headers={"HX-Request": "true"},
                                     check=fragment_ok)
        finally:
            inst.cleanup()
    res = {"connections": connections}
    for name, (wall, cpu) in (("page", page), ("fragment", fragment)):
        res[name] = {"p50": statistics.median(wall), "p95": pct(wall, 0.95), "cpu_p50": statistics.median(cpu),
                     "n": len(wall)}
        r = res[name]
        log(f"  {name:8s} p50 {r['p50'] * 1000:6.1f} ms  p95 {r['p95'] * 1000:6.1f} ms  "
            f"(CPU p50 {r['cpu_p50'] * 1000:.1f} ms; {r['n']} requests)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--profile", choices=("page", "fragment"), help="cProfile one URL instead")
    args = ap.parse_args()
    if args.profile:
        profile(args.profile, args.connections)
        return
    run(args.connections, args.requests)


def profile(which: str, connections: int) -> None:
    import cProfile
    import pstats

    with common.embedded_redis() as redis_url:
        inst = Instance(redis_url, "webprof")
        try:
            app = inst.create_app()
            seed(connections)
            client = signed_in_client(app)
            path, headers = (PAGE, {}) if which == "page" else (FRAGMENT, {"HX-Request": "true"})
            for _ in range(3):
                client.get(path, headers=headers)
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(10 if which == "page" else 100):
                client.get(path, headers=headers).get_data()
            pr.disable()
            pstats.Stats(pr).sort_stats("cumulative").print_stats(40)
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        finally:
            inst.cleanup()


if __name__ == "__main__":
    main()
