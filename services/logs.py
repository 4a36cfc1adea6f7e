"""Logging to a rotating file and stderr, set up once per process."""
from __future__ import annotations

import logging
import logging.handlers
import re
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
_configured: set[str] = set()

# A last line of defence: whatever a library puts in a message, these never
# reach the log file.
_SECRET_PATTERNS = [
    (re.compile(r"(?i)(password|passwd|client_secret|secret|token|assertion)(['\"]?\s*[:=]\s*['\"]?)[^\s'\",&}]+"), r"\1\2[redacted]"),
    (re.compile(r"(?i)(Authorization:\s*(?:Bearer|Basic|NTLM))\s+\S+"), r"\1 [redacted]"),
    (re.compile(r"(https?://[^:/\s@]+:)[^@\s/]+@"), r"\1[redacted]@"),
]


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = msg
        for pattern, repl in _SECRET_PATTERNS:
            clean = pattern.sub(repl, clean)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


def setup(log_file: str, level: str = "INFO") -> None:
    if log_file in _configured:
        return
    _configured.add(log_file)
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter(_FORMAT)
    redact = RedactingFilter()
    file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=5 * 1024 * 1024, backupCount=5,
                                                        encoding="utf-8")
    stream = logging.StreamHandler()
    for h in (file_handler, stream):
        h.setFormatter(fmt)
        h.addFilter(redact)
        root.addHandler(h)
    # exchangelib and urllib3 are chatty at INFO/DEBUG and may echo headers.
    for noisy in ("exchangelib", "urllib3", "msal", "imapclient", "requests_ntlm", "spnego"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
