"""Log2 latency histograms as the request figures (nbd/stats.py) and the lock manager's
(dlm/figures.py) keep them: a list of BUCKETS counts, bucket b counting times in
[2**(b-1), 2**b) units of 1024 ns (~1 µs; bucket 0: under 1 µs), found with a shift and
`int.bit_length` on the hot path. Here is what both show them as.
"""

from __future__ import annotations

BUCKETS = 48  # 2**47 µs is 4 years: no time falls off the end
UNIT_SHIFT = 10  # ns >> UNIT_SHIFT: the bucket unit, 1024 ns


def bucket_of(ns: int) -> int:
    return min((ns >> UNIT_SHIFT).bit_length(), BUCKETS - 1)


def bucket_bound_us(bucket: int) -> int:
    """The upper bound of `bucket` in whole microseconds, rounded (its times were less)."""
    return round((1 << (bucket + UNIT_SHIFT)) / 1000)


def as_json(counts: list[int]) -> dict[str, int]:
    """{upper bound in µs: count} of the buckets that counted anything."""
    return {str(bucket_bound_us(b)): n for b, n in enumerate(counts) if n}


def percentile_us(latency: dict[str, int], fraction: float) -> int | None:
    """The bucket bound below which `fraction` of an as_json() histogram's times fell."""
    total = sum(latency.values())
    if not total:
        return None
    seen = 0
    for bound, count in sorted(latency.items(), key=lambda item: int(item[0])):
        seen += count
        if seen >= fraction * total:
            return int(bound)
    return None
