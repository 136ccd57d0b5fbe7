"""cluster.fossil: the Fossil delta format (issue 15's delta frames), against itself and npm fossil-delta.

Run as a script (``.venv/bin/python tests/test_fossil.py``) it prints the encode/decode
timings quoted in cluster/fossil.py's docstring.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from fossil_fixtures import FIXTURES, NPM_MODULE, book_pair, order_book, run_npm, unb64
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.fossil import DIGITS, FossilError, checksum, decode, encode, output_size

FIXTURE = json.loads(FIXTURES.read_text())


def fixture_cases(kind: str) -> list[pytest.param]:
    return [
        pytest.param(unb64(case["source"]), unb64(case["target"]), unb64(case["delta"]), id=case["name"])
        for case in FIXTURE[kind]
    ]


def related(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A target made from pieces of the source and new bytes, so that copies are found."""
    source = draw(st.binary(max_size=600))
    pieces = []
    for _ in range(draw(st.integers(0, 8))):
        if source and draw(st.booleans()):
            start = draw(st.integers(0, len(source) - 1))
            pieces.append(source[start : start + draw(st.integers(1, 200))])
        else:
            pieces.append(draw(st.binary(max_size=40)))
    return source, b"".join(pieces)


related_pairs = st.composite(related)()


@given(st.binary(max_size=2000), st.binary(max_size=2000))
def test_random_pairs_round_trip(source, target):
    assert decode(source, encode(source, target)) == target


@given(related_pairs)
def test_related_pairs_round_trip(pair):
    source, target = pair
    assert decode(source, encode(source, target)) == target


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 8))
def test_order_book_updates_round_trip_byte_for_byte(seed, changes):
    source, target = book_pair(seed, changes)
    delta = encode(source, target)
    assert decode(source, delta) == target
    assert len(delta) < len(target) // 4, "a few changed levels cost a small fraction of the book"


@given(st.text(max_size=300), st.text(max_size=300))
def test_the_delta_of_utf8_text_is_utf8(source, target):
    # a copy never splits a character, so the delta can travel inside a JSON string
    delta = encode(source.encode(), target.encode() + source.encode())
    delta.decode("utf-8")


def test_the_encoder_copies_instead_of_inserting():
    source, target = book_pair(7, 2)
    delta = encode(source, target)
    assert delta.count(b"@") >= 2, "unchanged stretches of the book are copies"
    assert len(delta) < len(target) // 10


def test_identical_payloads_are_one_copy():
    book = json.dumps(order_book(random.Random(3))).encode()
    delta = encode(book, book)
    assert delta.count(b"@") == 1
    assert b":" not in delta
    assert len(delta) < 20


def test_output_size_reads_the_header():
    source, target = book_pair(1)
    assert output_size(encode(source, target)) == len(target)


def test_checksum_is_the_sum_of_big_endian_words_zero_padded():
    assert checksum(b"") == 0
    assert checksum(b"\x00\x00\x00\x01\x00\x00\x00\x02") == 3
    assert checksum(b"\x01") == 0x01000000
    assert checksum(b"\xff\xff\xff\xff\x00\x00\x00\x02") == 1  # modulo 2**32


# --- corrupt deltas never give bytes ---------------------------------------------------

SOURCE, TARGET = book_pair(11, 4)
DELTA = encode(SOURCE, TARGET)


@pytest.mark.parametrize("length", [0, 1, 3, len(DELTA) // 2, len(DELTA) - 1])
def test_a_truncated_delta_is_refused(length):
    with pytest.raises(FossilError):
        decode(SOURCE, DELTA[:length])


@given(st.integers(0, len(DELTA) - 1))
def test_any_truncation_is_refused(length):
    with pytest.raises(FossilError):
        decode(SOURCE, DELTA[:length])


def base64_number(value: int) -> bytes:
    out = b""
    while True:
        out = DIGITS[value % 64 : value % 64 + 1] + out
        value //= 64
        if not value:
            return out


def test_a_bad_checksum_is_refused():
    trailer = base64_number(checksum(TARGET)) + b";"
    assert DELTA.endswith(trailer)
    forged = DELTA[: -len(trailer)] + base64_number((checksum(TARGET) + 1) % 2**32) + b";"
    with pytest.raises(FossilError, match="checksum"):
        decode(SOURCE, forged)


def test_a_delta_for_another_source_is_refused():
    other, _ = book_pair(12, 4)
    with pytest.raises(FossilError):
        decode(other, DELTA)


def test_a_copy_outside_the_source_is_refused():
    with pytest.raises(FossilError, match="past the 4-byte source"):
        decode(b"abcd", b"3\n3@2,0;")
    with pytest.raises(FossilError, match="past the"):
        decode(b"abcd", b"1\n1@4,0;")


def test_a_wrong_length_is_refused():
    target = b"hello"
    good = encode(b"", target)
    assert decode(b"", good) == target
    with pytest.raises(FossilError, match="announced"):
        decode(b"", b"4" + good[1:])  # header says 4, the literal writes 5
    with pytest.raises(FossilError, match="announced 6"):
        decode(b"", b"6" + good[1:])  # header says 6, only 5 are built
    with pytest.raises(FossilError, match="longer than the rest"):
        decode(b"", b"5\n9:hel")


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (b"", "target size"),
        (b"\n", "target size"),
        (b"5", "header"),
        (b"5x", "newline"),
        (b"5\n5!hello", "unknown segment operator"),
        (b"5\n5@0;", "terminated by ','"),
        (b"5\n:hello", "segment length"),
        (b"zzzzzzz\n", "32 bits"),
        (b"0\n0;junk", "follow the checksum"),
        (b"0\n", "without its checksum"),
    ],
)
def test_malformed_deltas_say_what_is_wrong(delta, message):
    with pytest.raises(FossilError, match=message):
        decode(b"hello world, a source of some length", delta)


def test_max_size_refuses_a_large_target_before_building_it():
    with pytest.raises(FossilError, match="more than"):
        decode(b"x" * 64, b"V00\n0@0,0;", max_size=65536)


@given(st.binary(max_size=300))
def test_garbage_is_refused_or_rebuilds_the_target(garbage):
    # FossilError or exactly the bytes the checksum vouches for; never an exception of another kind
    try:
        out = decode(SOURCE, garbage)
    except FossilError:
        return
    assert len(out) == output_size(garbage)


@given(st.integers(0, len(DELTA) - 1), st.integers(1, 255))
def test_a_flipped_byte_never_yields_other_bytes_silently(position, flip):
    corrupt = bytearray(DELTA)
    corrupt[position] ^= flip
    try:
        out = decode(SOURCE, bytes(corrupt))
    except FossilError:
        return
    assert out == TARGET  # only a change the format cannot see (e.g. "0" → "00") may pass


# --- the reference implementation (npm fossil-delta) ------------------------------------


@pytest.mark.parametrize(("source", "target", "delta"), fixture_cases("npm"))
def test_npm_deltas_apply_exactly(source, target, delta):
    assert output_size(delta) == len(target)
    assert decode(source, delta) == target


@pytest.mark.parametrize(("source", "target", "delta"), fixture_cases("python"))
def test_committed_python_deltas_still_apply(source, target, delta):
    assert decode(source, delta) == target


NPM_MISSING = (
    "node is not installed"
    if shutil.which("node") is None
    else None
    if NPM_MODULE.exists()
    else f"npm fossil-delta is not at {NPM_MODULE} (set FOSSIL_DELTA_JS; CI has node but not the package)"
)


@pytest.mark.skipif(NPM_MISSING is not None, reason=NPM_MISSING or "")
def test_npm_applies_our_deltas():
    import base64

    rng = random.Random(2026)
    pairs = [book_pair(seed, changes) for seed in range(8) for changes in (0, 3, 8)]
    pairs += [(rng.randbytes(rng.randrange(2000)), rng.randbytes(rng.randrange(2000))) for _ in range(10)]
    pairs += [(s, s[: len(s) // 3] + rng.randbytes(50) + s[len(s) // 2 :]) for s, _ in pairs[:10]]
    pairs += [("€ ордер 🚀".encode() * 30, "€ ордер! 🚀".encode() * 30)]
    items = [
        {"source": base64.b64encode(source).decode(), "delta": base64.b64encode(encode(source, target)).decode()}
        for source, target in pairs
    ]
    results = run_npm("apply", items)
    for (_, target), result in zip(pairs, results, strict=True):
        assert "error" not in result, result
        assert unb64(result["target"]) == target


def _measure() -> None:
    import os
    import timeit

    old, new = book_pair(1, 3)
    delta = encode(old, new)
    runs = 2000
    enc = min(timeit.repeat(lambda: encode(old, new), number=runs, repeat=5)) / runs
    dec = min(timeit.repeat(lambda: decode(old, delta), number=runs, repeat=5)) / runs
    print(f"order book {len(new)} B → delta {len(delta)} B: encode {enc * 1e6:.0f} µs, decode {dec * 1e6:.0f} µs")
    a, b = os.urandom(5500), os.urandom(5500)
    worst = min(timeit.repeat(lambda: encode(a, b), number=50, repeat=5)) / 50
    print(f"two unrelated 5.5 KB payloads: encode {worst * 1e6:.0f} µs")


if __name__ == "__main__":
    _measure()
