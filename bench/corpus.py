"""Real-looking mail for the benchmarks, made on the fly (deterministic).

The mix is what a phishing-report mailbox receives: mostly short reports
with a text and an HTML part, some with an attachment (image, PDF, Office
file), a few large ones, and a few reports that forward the suspicious
email as an attachment (message/rfc822). `--corpus DIR` uses *.eml files
from a directory instead.

    python bench/corpus.py OUT_DIR [--n 500]   writes the generated corpus as .eml files
"""
from __future__ import annotations

import argparse
import email.message
import email.policy
import email.utils
import random
from pathlib import Path

_WORDS = ("account invoice password urgent verify payment update security bank login delivery parcel "
          "confirm suspended review document shared signature reset mailbox quota expired access "
          "transfer wire refund customer support team notice action required click below link within "
          "hours failure legal department office please kindly attached details regards thanks").split()
_NAMES = ("Alice Martin", "Bob Keller", "Chloé Dubois", "Dmitri Ivanov", "Eva Nowak", "Farid Haddad",
          "Grace O'Neil", "Hiro Tanaka", "Ines García", "Jonas Berg", "Katrin Müller", "Liam Walsh")
_BAD_DOMAINS = ("secure-login-verify.com", "micros0ft-support.net", "paypa1-billing.info", "dhl-parcel-track.co",
                "office365-auth.online", "bank-alerts-secure.biz", "docu-sign-review.app")
_ATTACHMENTS = (("application/pdf", "invoice_{}.pdf"), ("image/png", "screenshot_{}.png"),
                ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", "document_{}.docx"),
                ("application/zip", "archive_{}.zip"), ("image/jpeg", "photo_{}.jpg"))


def _sentence(r: random.Random, n: int) -> str:
    return " ".join(r.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _paragraphs(r: random.Random, target_bytes: int) -> list[str]:
    out, size = [], 0
    while size < target_bytes:
        p = " ".join(_sentence(r, r.randint(6, 16)) for _ in range(r.randint(2, 6)))
        if r.random() < 0.35:
            dom = r.choice(_BAD_DOMAINS)
            p += f" Visit https://{dom}/login?id={r.randrange(10**8)} or http://{r.randint(11, 223)}." \
                 f"{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}/x.php now."
        out.append(p)
        size += len(p) + 2
    return out


def _address(r: random.Random, domain: str | None = None) -> str:
    name = r.choice(_NAMES)
    user = name.split()[0].lower().replace("é", "e").replace("ü", "u")
    return email.utils.formataddr((name, f"{user}.{r.randrange(1000)}@{domain or 'corp.example.com'}"))


def _base(r: random.Random, i: int, subject: str, sender: str) -> email.message.EmailMessage:
    m = email.message.EmailMessage()
    m["From"] = sender
    m["To"] = "phishing@corp.example.com"
    m["Subject"] = subject
    m["Date"] = email.utils.formatdate(1_780_000_000 + r.randrange(30 * 86400), localtime=False)
    m["Message-ID"] = f"<bench-{i}-{r.randrange(16 ** 12):012x}@corp.example.com>"
    m["Received"] = (f"from mx{r.randint(1, 9)}.corp.example.com ([10.0.{r.randint(0, 255)}.{r.randint(1, 254)}]) "
                     f"by mail.corp.example.com with ESMTPS id {r.randrange(16 ** 10):010x}")
    m["X-Mailer"] = r.choice(("Microsoft Outlook 16.0", "Apple Mail (2.3774)", "Thunderbird 128.3"))
    return m


def _text_and_html(m: email.message.EmailMessage, paras: list[str]) -> None:
    m.set_content("\n\n".join(paras) + "\n\n-- \nSent from the reporting add-in\n")
    html = "".join(f"<p>{p}</p>" for p in paras)
    m.add_alternative(f"<html><head><style>p{{font-family:Calibri}}</style></head><body>{html}"
                      f"<table><tr><td>Reported via Intake</td></tr></table></body></html>", subtype="html")


def _attach(r: random.Random, m: email.message.EmailMessage, i: int, size: int) -> None:
    ctype, pattern = r.choice(_ATTACHMENTS)
    maintype, subtype = ctype.split("/", 1)
    m.add_attachment(r.randbytes(size), maintype=maintype, subtype=subtype, filename=pattern.format(i))


def make_message(i: int, seed: int = 1) -> bytes:
    """Message `i` of the generated corpus (same bytes for the same i and seed)."""
    r = random.Random(seed * 1_000_003 + i)
    kind = r.random()
    subject = f"{r.choice(('Suspicious', 'FW:', 'Phishing?', 'Report:', 'Is this real?'))} " \
              f"{_sentence(r, r.randint(3, 8))[:-1]}"
    if kind < 0.05:  # the suspicious email forwarded as an attachment
        original = _base(r, i, "Your mailbox is almost full", _address(r, r.choice(_BAD_DOMAINS)))
        _text_and_html(original, _paragraphs(r, r.randint(1500, 6000)))
        if r.random() < 0.5:
            _attach(r, original, i, r.randint(10_000, 80_000))
        m = _base(r, i, "FW: Your mailbox is almost full", _address(r))
        _text_and_html(m, _paragraphs(r, r.randint(200, 800)))
        m.add_attachment(original, filename="Your mailbox is almost full.eml")
        return bytes(m)
    m = _base(r, i, subject, _address(r))
    _text_and_html(m, _paragraphs(r, r.randint(1500, 12_000)))
    if kind < 0.67:
        pass  # text + HTML only
    elif kind < 0.87:
        _attach(r, m, i, r.randint(15_000, 120_000))
    elif kind < 0.975:
        _attach(r, m, i, r.randint(150_000, 500_000))
        if r.random() < 0.3:
            _attach(r, m, i + 1, r.randint(10_000, 60_000))
    else:  # large: above the connector's 2 MiB chunking threshold
        _attach(r, m, i, r.randint(1_700_000, 2_600_000))
    return bytes(m)


def make_message_of_size(size: int, seed: int = 7) -> bytes:
    """One report whose raw size is about `size` bytes (a big base64 attachment)."""
    r = random.Random(seed)
    m = _base(r, 0, f"Large report {size // 1_000_000} MB", _address(r))
    _text_and_html(m, _paragraphs(r, 4000))
    attachment = max(0, int((size - 12_000) * 0.75 * 76 / 77))  # base64: 4/3, plus a CRLF every 76
    _attach(r, m, 0, attachment)
    return bytes(m)


def generate(n: int, seed: int = 1) -> list[bytes]:
    return [make_message(i, seed) for i in range(n)]


def load_dir(directory: str | Path, limit: int | None = None) -> list[bytes]:
    files = sorted(p for p in Path(directory).rglob("*.eml") if p.is_file())
    if not files:
        raise SystemExit(f"No *.eml files under {directory}")
    if limit:
        files = files[:limit]
    return [p.read_bytes() for p in files]


def describe(msgs: list[bytes]) -> str:
    sizes = sorted(len(m) for m in msgs)
    total = sum(sizes)
    fw = sum(1 for m in msgs if b"message/rfc822" in m)
    att = sum(1 for m in msgs if b"Content-Disposition: attachment" in m)
    return (f"{len(msgs)} messages, {total / 1e6:.1f} MB (median {sizes[len(sizes) // 2] / 1e3:.0f} kB, "
            f"largest {sizes[-1] / 1e6:.1f} MB; {att} with attachments, {fw} forwarded as attachment)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    msgs = generate(args.n)
    for i, raw in enumerate(msgs):
        (out / f"{i:05d}.eml").write_bytes(raw)
    print(describe(msgs))


if __name__ == "__main__":
    main()
