"""The baseline: what classic helpdesk mail fetchers do.

imaplib, SEARCH UNSEEN, then one `FETCH n (RFC822)` per message (which also
sets \\Seen), the whole message in memory, parsed with the stdlib `email`
package (compat32, as those fetchers use it), subject and sender decoded,
every part decoded (text body, HTML body, attachments), and the raw message
written to a file. No fsync, no database, no content addressing: it is
deliberately the cheap way.

    python bench/naive_fetch.py HOST PORT USER PASSWORD OUT_DIR
    python bench/naive_fetch.py --rss HOST PORT USER PASSWORD OUT_DIR
        (prints {"idle_kb": ..., "peak_kb": ...} for the memory benchmark)
"""
from __future__ import annotations

import email
import email.header
import imaplib
import json
import os
import sys


def _decode(value) -> str:
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return str(value)


def handle(raw: bytes, path: str) -> dict:
    """Parse one message the classic way and write it to `path`."""
    msg = email.message_from_bytes(raw)
    info = {"subject": _decode(msg["Subject"]), "from": _decode(msg["From"]), "text": "", "html": "",
            "attachments": []}
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        ctype = part.get_content_type()
        if filename or part.get("Content-Disposition", "").startswith("attachment"):
            info["attachments"].append((_decode(filename), ctype, len(payload)))
        elif ctype == "text/plain" and not info["text"]:
            info["text"] = payload.decode(part.get_content_charset() or "utf-8", "replace")
        elif ctype == "text/html" and not info["html"]:
            info["html"] = payload.decode(part.get_content_charset() or "utf-8", "replace")
    with open(path, "wb") as f:
        f.write(raw)
    return info


def fetch_all(host: str, port: int, user: str, password: str, out_dir: str) -> int:
    """Fetch every unread message; returns how many were handled."""
    os.makedirs(out_dir, exist_ok=True)
    imap = imaplib.IMAP4(host, int(port))
    try:
        imap.login(user, password)
        imap.select("INBOX")
        _typ, data = imap.search(None, "UNSEEN")
        n = 0
        for num in data[0].split():
            _typ, msg_data = imap.fetch(num, "(RFC822)")
            raw = msg_data[0][1]
            handle(raw, os.path.join(out_dir, f"{num.decode()}.eml"))
            n += 1
        return n
    finally:
        try:
            imap.logout()
        except Exception:
            pass


def main(argv: list[str]) -> int:
    rss = argv[1:2] == ["--rss"]
    args = argv[2:] if rss else argv[1:]
    if len(args) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, user, password, out_dir = args
    if rss:
        import resource

        def status_kb(field: str) -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

        idle = status_kb("VmRSS")  # after imports: the idle RSS
        n = fetch_all(host, int(port), user, password, out_dir)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"idle_kb": idle, "peak_kb": peak, "hwm_kb": status_kb("VmHWM"), "messages": n}))
    else:
        print(fetch_all(host, int(port), user, password, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
