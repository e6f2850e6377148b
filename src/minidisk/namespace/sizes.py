"""Sizes with NetBSD strsuftoll(3) suffixes, as rump_server's `-r`, `size=` and `offset=` take them.

A size is decimal digits, an optional lowercase suffix, and optionally ``x`` or ``*`` and another
size to multiply by (so ``2x512``, ``4k*3`` and ``2x2x2b`` all work):

====== === ==== ===== ===== ===== ===============
suffix  b   k    m     g     t     w
bytes   512 1024 2**20 2**30 2**40 4 (sizeof int)
====== === ==== ===== ===== ===== ===============

Every size option of minidisk takes this one grammar (``--memory``, ``--null``, ``--file``
windows, ``-r``, ``--payload-budget``, drivespec ``size=``/``offset=``, ``etfs register
--begin/--size``, ``quickstart --size``), so a bare ``b`` is 512 bytes everywhere (as in
rump_server and dd). Beyond rump_server's lowercase suffixes it takes the IEC/SI ones of GNU
coreutils: ``K M G T P E`` and ``KiB MiB GiB TiB PiB EiB`` are powers of 1024, ``kB KB MB GB
TB PB EB`` powers of 1000. (``dmsetup stats`` keeps dmsetup's own units, as scripts expect.)

Unlike strsuftoll we accept no leading blanks or signs: a drivespec never needs them, and a
stray ``-`` is more likely a typo than an intent. Results must fit in an off_t (2**63 - 1).
"""

from __future__ import annotations

import re

MAX_SIZE = 2**63 - 1  # off_t: no host file or window can be larger

# rump_server's (strsuftoll's) suffixes, kept exactly.
SUFFIXES = {"b": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "w": 4}
# IEC and SI suffixes, as GNU coreutils reads them (truncate -s, dd).
EXTRA_SUFFIXES = {
    **{p: 1 << (10 * (i + 1)) for i, p in enumerate("KMGTPE")},
    **{p + "iB": 1 << (10 * (i + 1)) for i, p in enumerate("KMGTPE")},
    **{p + "B": 1000 ** (i + 1) for i, p in enumerate("KMGTPE")},
    "kB": 1000,
}
ALL_SUFFIXES = {**SUFFIXES, **EXTRA_SUFFIXES}

_FACTOR = re.compile(r"([0-9]+)([A-Za-z]*)")
GRAMMAR = "digits with b (512), k, m, g, t, w (4), K/KiB, M/MiB, G/GiB, T/TiB, KB, MB, GB, TB"


class SizeError(ValueError):
    """A size that does not parse or does not fit; the message says which."""


def parse_size(text: str, maximum: int = MAX_SIZE) -> int:
    """Bytes that `text` denotes; SizeError when it is malformed or larger than `maximum`."""
    total = 1
    for factor in text.replace("*", "x").split("x"):
        match = _FACTOR.fullmatch(factor)
        if match is None or match[2] not in ALL_SUFFIXES and match[2]:
            raise SizeError(f"{text!r}: illegal number (a size is {GRAMMAR}; "
                            "products with x)")
        digits = match[1].lstrip("0") or "0"
        if len(digits) > len(str(maximum)):  # also keeps int() away from its digit limit
            raise SizeError(f"{text!r}: too large (more than {maximum})")
        total *= int(digits) * ALL_SUFFIXES.get(match[2], 1)
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
