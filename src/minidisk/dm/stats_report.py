"""libdm-stats' side of `dmsetup stats`: the kernel's @stats_list and @stats_print answers read
back into regions and areas, and the values of the report fields (dm/fields.py) for them.

Rows are libdm's objects: an area of a region, or a region (for `list`, and after the areas
of a region that has more than one). Sizes print as libdm's human-readable units (0, 512b,
1.00k, 4.00m); counters as the kernel counted them, times in nanoseconds (milliseconds
times 10^6 unless the region is precise). The rate fields (reads_per_sec, await, util...)
and the histograms need libdm's sampling interval and are not reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SECTOR = 512
NSEC_PER_MSEC = 1_000_000
PROGRAM_ID = "dmstats"  # libdm's DM_STATS_PROGRAM_ID, what dmsetup stats uses by default
# The kernel's 13 counters per area, in @stats_print's order.
COUNTERS = ("reads", "reads_merged", "read_sectors", "read_ticks", "writes",
            "writes_merged", "write_sectors", "write_ticks", "in_progress", "io_ticks",
            "queue_ticks", "read_io_ticks", "write_io_ticks")
STATS_LIST_FIELDS = "stats_name,group_id,region_id,obj_type,region_start,region_len," \
                    "area_count,area_len,program_id"
STATS_AREA_LIST_FIELDS = "stats_name,group_id,region_id,obj_type,region_start,region_len," \
                         "area_count,area_id,area_start,area_len,program_id"


@dataclass
class Region:
    """One line of @stats_list: `ID: START+LENGTH STEP PROGRAM AUX [precise_timestamps]
    [histogram:B,...]`, and its areas' counters once printed."""

    device: str
    id: int
    start: int
    length: int
    step: int
    program_id: str
    aux_data: str
    precise: bool = False
    bounds: list[int] = field(default_factory=list)
    areas: list[list[int]] = field(default_factory=list)

    @property
    def area_count(self) -> int:
        return -(-self.length // self.step)

    @property
    def user_data(self) -> str:
        return "" if self.aux_data == "-" else self.aux_data


def parse_list(device: str, text: str) -> list[Region]:
    regions = []
    for line in text.splitlines():
        head, _, rest = line.partition(": ")
        words = rest.split()
        start, _, length = words[0].partition("+")
        region = Region(device, int(head), int(start), int(length), int(words[1]), words[2],
                        words[3])
        for extra in words[4:]:
            if extra == "precise_timestamps":
                region.precise = True
            elif extra.startswith("histogram:"):
                region.bounds = [int(b) for b in extra[10:].split(",")]
        regions.append(region)
    return regions


def parse_print(text: str) -> list[list[int]]:
    """Each area's 13 counters (its histogram, after them, is not reported)."""
    return [[int(w) for w in line.split()[1:14]] for line in text.splitlines()]


@dataclass(frozen=True)
class Row:
    region: Region
    area: int | None  # None: the region as a whole

    def counter(self, name: str) -> int:
        index = COUNTERS.index(name)
        if self.area is not None:
            return self.region.areas[self.area][index] if self.region.areas else 0
        return sum(a[index] for a in self.region.areas)

    def nsecs(self, name: str) -> int:
        value = self.counter(name)
        return value if self.region.precise else value * NSEC_PER_MSEC


def rows(regions: list[Region], areas: bool) -> list[Row]:
    """A device's rows: its regions, or (`areas`) every area, then each region that has
    more than one, as libdm walks them."""
    if not areas:
        return [Row(r, None) for r in regions]
    return [Row(r, a) for r in regions for a in range(r.area_count)] + \
        [Row(r, None) for r in regions if r.area_count > 1]


def human_size(sectors: int) -> str:
    """libdm's dm_size_to_string with units 'h': 0, 512b, 1.00k, 4.00m ... (in its
    uint64_t: bytes wrap at 2^64, so a region row's area start can print 0b)."""
    if not sectors:
        return "0"
    size = sectors * SECTOR % 2 ** 64
    for unit, power in (("e", 6), ("p", 5), ("t", 4), ("g", 3), ("m", 2), ("k", 1)):
        if size >= 1024 ** power:
            return f"{size / 1024 ** power:.2f}{unit}"
    return f"{size}b"


# libdm's walk flag on a region row's area id (DM_STATS_WALK_REGION): its area start is
# computed with the flag still set, start + step * 2^49 in a uint64_t.
WALK_REGION = 1 << 49


def _area_start(row: Row) -> int:
    area = WALK_REGION if row.area is None else row.area
    return (row.region.start + area * row.region.step) % 2 ** 64


def _bounds(row: Row) -> str:
    """The histogram's boundaries, each in the largest unit that divides it."""
    scale = 1 if row.region.precise else NSEC_PER_MSEC
    out = []
    for bound in row.region.bounds:
        ns = bound * scale
        unit, per = next((u, p) for u, p in (("s", 10 ** 9), ("ms", 10 ** 6),
                                             ("us", 10 ** 3), ("ns", 1)) if ns % p == 0)
        out.append(f"{ns // per}{unit}")
    return ",".join(out)


STATS_VALUES: dict[str, Callable[[Row], Any]] = {
    "name": lambda r: r.region.device,
    "stats_name": lambda r: r.region.device,
    "group_id": lambda r: "-",  # no groups here
    "region_id": lambda r: r.region.id,
    "obj_type": lambda r: "region" if r.area is None else "area",
    "region_start": lambda r: r.region.start,
    "region_len": lambda r: r.region.length,
    "area_id": lambda r: r.area or 0,
    "area_start": _area_start,
    "area_len": lambda r: r.region.step,
    "area_offset": lambda r: (r.area or 0) * r.region.step,
    "area_count": lambda r: r.region.area_count,
    "program_id": lambda r: r.region.program_id,
    "user_data": lambda r: r.region.user_data,
    "precise": lambda r: int(r.region.precise),
    "hist_bins": lambda r: len(r.region.bounds) + 1 if r.region.bounds else 0,
    "hist_bounds": _bounds,
    "read_count": lambda r: r.counter("reads"),
    "reads_merged_count": lambda r: r.counter("reads_merged"),
    "read_sector_count": lambda r: r.counter("read_sectors"),
    "read_time": lambda r: r.nsecs("read_ticks"),
    "write_count": lambda r: r.counter("writes"),
    "writes_merged_count": lambda r: r.counter("writes_merged"),
    "write_sector_count": lambda r: r.counter("write_sectors"),
    "write_time": lambda r: r.nsecs("write_ticks"),
    "in_progress_count": lambda r: r.counter("in_progress"),
    "io_ticks": lambda r: r.nsecs("io_ticks"),
    "queue_ticks": lambda r: r.nsecs("queue_ticks"),
    "read_ticks": lambda r: r.nsecs("read_io_ticks"),
    "write_ticks": lambda r: r.nsecs("write_io_ticks"),
}
SIZE_FIELDS = {"region_start", "region_len", "area_start", "area_len", "area_offset"}


def show(field_id: str, value: Any) -> str:
    return human_size(value) if field_id in SIZE_FIELDS else str(value)
