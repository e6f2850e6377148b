"""parse_size: strsuftoll suffixes and products, as `-r`, `size=` and `offset=` take them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidisk.namespace.sizes import MAX_SIZE, SUFFIXES, SizeError, format_size, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0),
    ("1", 1),
    ("007", 7),
    ("1b", 512),
    ("1k", 1024),
    ("16m", 16 << 20),
    ("3g", 3 << 30),
    ("2t", 2 << 40),
    ("5w", 20),
    ("2x512", 1024),
    ("2*512", 1024),
    ("4kx3", 12288),
    ("2x2x2b", 4096),
    ("1x1x1x1", 1),
    ("0x10", 0),  # strsuftoll: a product, not hex
    ("8388607t", 8388607 << 40),
    (str(MAX_SIZE), MAX_SIZE),
])
def test_good_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", " 1", "1 ", "-1", "+1", "1kb", "k", "x", "2x", "x2", "2xx2", "2**2",
    "1.5m", "1e3", "１", "8388608t", str(MAX_SIZE + 1), "9" * 5000, "host",
])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(SizeError, match="illegal number|too large"):
        parse_size(text)


def test_maximum_is_enforced_per_product() -> None:
    assert parse_size("4x4", maximum=16) == 16
    with pytest.raises(SizeError, match="too large"):
        parse_size("4x5", maximum=16)


@given(st.integers(0, MAX_SIZE))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["", *SUFFIXES])),
                min_size=1, max_size=4),
       st.sampled_from(["x", "*"]))
def test_products_multiply(factors: list[tuple[int, str]], sep: str) -> None:
    text = sep.join(f"{n}{suffix}" for n, suffix in factors)
    # Like strsuftoll, the product is checked after every factor: an intermediate overflow
    # is an error even when a later factor of 0 would bring it back (1kx8192tx0).
    expected, overflowed = 1, False
    for n, suffix in factors:
        expected *= n * SUFFIXES.get(suffix, 1)
        overflowed = overflowed or expected > MAX_SIZE
    if overflowed:
        with pytest.raises(SizeError):
            parse_size(text)
    else:
        assert parse_size(text) == expected
