"""Sizes with NetBSD strsuftoll(3) suffixes, as rump_server's `-r`, `size=` and `offset=` take them.

A size is decimal digits, an optional lowercase suffix, and optionally ``x`` or ``*`` and another
size to multiply by (so ``2x512``, ``4k*3`` and ``2x2x2b`` all work):

====== === ==== ===== ===== ===== ===============
suffix  b   k    m     g     t     w
bytes   512 1024 2**20 2**30 2**40 4 (sizeof int)
====== === ==== ===== ===== ===== ===============

Unlike strsuftoll we accept no leading blanks or signs: a drivespec never needs them, and a
stray ``-`` is more likely a typo than an intent. Results must fit in an off_t (2**63 - 1).
"""

from __future__ import annotations

import re

MAX_SIZE = 2**63 - 1  # off_t: no host file or window can be larger

SUFFIXES = {"b": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "w": 4}

_FACTOR = re.compile(r"([0-9]+)([bkmgtw]?)")


class SizeError(ValueError):
    """A size that does not parse or does not fit; the message says which."""


def parse_size(text: str, maximum: int = MAX_SIZE) -> int:
    """Bytes that `text` denotes; SizeError when it is malformed or larger than `maximum`."""
    total = 1
    for factor in text.replace("*", "x").split("x"):
        match = _FACTOR.fullmatch(factor)
        if match is None:
            raise SizeError(f"{text!r}: illegal number")
        digits = match[1].lstrip("0") or "0"
        if len(digits) > len(str(maximum)):  # also keeps int() away from its digit limit
            raise SizeError(f"{text!r}: too large (more than {maximum})")
        total *= int(digits) * SUFFIXES.get(match[2], 1)
        if total > maximum:  # checked per factor, so an absurd product stays cheap
            raise SizeError(f"{text!r}: too large (more than {maximum})")
    return total


def format_size(n: int) -> str:
    """A short spelling that parse_size reads back as `n` (largest exact binary suffix)."""
    for suffix in "tgmk":
        unit = SUFFIXES[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
