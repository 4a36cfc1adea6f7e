"""Base64 bodies: the SIMD fast path decodes exactly as binascii would.

Attachments decode through pybase64 when the body is plain base64 (only the
alphabet and white space, padding only at the end); everything else takes
the careful path. These tests pin that the fast path never changes a result.
"""
import base64
import binascii
import random

import pytest

from ingest.parse import _b64decode_lenient, _plain_base64

ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
SPACE = b"\r\n\t "


def _binascii_or_none(data: bytes):
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        return None


def _random_plain_candidates(rng: random.Random, count: int):
    for _ in range(count):
        if rng.random() < 0.4:
            data = bytearray(base64.encodebytes(rng.randbytes(rng.randint(0, 400))))
            for _ in range(rng.randint(0, 3)):  # a stray character, line break or "=" anywhere
                at = rng.randint(0, len(data))
                data[at:at] = bytes([rng.choice(ALPHABET + SPACE + b"=")])
        else:
            data = bytearray(rng.choice(ALPHABET + SPACE + b"=") for _ in range(rng.randint(0, 40)))
        yield (bytes(data) + b"=" * rng.choice([0, 0, 1, 2, 3, 4])
               + bytes(rng.choice(SPACE) for _ in range(rng.randint(0, 2))))


def test_fast_path_decodes_exactly_as_binascii_on_plain_base64():
    rng = random.Random(20261130)
    checked = 0
    for data in _random_plain_candidates(rng, 30000):
        if not _plain_base64(data):
            continue
        expected = _binascii_or_none(data)
        if expected is None:
            continue  # binascii refuses it: the careful path decides, as before
        assert _b64decode_lenient(data) == expected, data
        assert _b64decode_lenient(memoryview(b"xx" + data)[2:]) == expected, data
        checked += 1
    assert checked > 5000  # the generator really produced plain, decodable bodies


@pytest.mark.parametrize("size", [0, 1, 2, 3, 57, 76, 4096, 3_000_001])
def test_attachment_sized_bodies_round_trip(size):
    raw = random.Random(size).randbytes(size)
    for encoded in (base64.encodebytes(raw), base64.encodebytes(raw).replace(b"\n", b"\r\n"), base64.b64encode(raw)):
        assert _b64decode_lenient(encoded) == raw


@pytest.mark.parametrize("data, expected", [
    (b"QUJD\r\nREVG\r\n", b"ABCDEF"),
    (b"QQ==\r\n", b"A"),
    (b"QQ===\n", b"A"),              # extra padding is ignored, as binascii does
    (b"QQ\n", b"A"),                  # missing padding is repaired (careful path)
    (b"QUJD*REVG", b"ABCDEF"),        # junk skipped (careful path)
    (b"QQ==QkM=", b"ABC"),            # concatenated padded chunks (careful path)
    (b"QUJDR", b"ABC"),               # a lone trailing character is dropped
])
def test_lenient_results_are_unchanged(data, expected):
    assert _b64decode_lenient(data) == expected
