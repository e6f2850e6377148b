"""Device-mapper statistics: the kernel's dm-stats, counted in our dm layer.

What a program sees is the kernel's interface (Documentation/admin-guide/device-mapper/
statistics.rst, drivers/md/dm-stats.c): messages to the device, `@stats_create`,
`@stats_delete`, `@stats_clear`, `@stats_list`, `@stats_print`, `@stats_print_clear` and
`@stats_set_aux`, with the kernel's arguments, answers and errnos. A region covers a range of
sectors split into areas of `step` sectors; each area counts, per direction, the requests
completed, the ones that continued the previous request ("merges"), sectors, and ticks, and
the time requests were in flight (io ticks, also per direction) and their sum weighted by how
many were (time in queue). Ticks are milliseconds, or nanoseconds in a region created with
`precise_timestamps`; a region with `histogram:B1,B2,...` also counts completions by latency.

Cost: a device without regions pays nothing. Its calls are the class's (dm/route.py's fast
path untouched); creating the first region puts counting wrappers over the device's I/O
methods, on the instance, and deleting the last one takes them away (`DeviceStats.attach`).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minidisk.dm.mapped import MappedDevice

READ, WRITE = 0, 1
SECTOR = 512
# Areas per region at most: the kernel refuses (ENOMEM) what would take a quarter of its
# memory; a message off the wire must not make us allocate without bound either.
MAX_AREAS = 1 << 20
MESSAGES = ("@stats_create", "@stats_delete", "@stats_clear", "@stats_list", "@stats_print",
            "@stats_print_clear", "@stats_set_aux")
# The calls that carry data, with their direction (trim and zero are writes, as a discard
# or write-zeroes bio is to the kernel) and how to find the byte range in their arguments.
COUNTED: dict[str, tuple[int, Callable[..., tuple[int, int]]]] = {
    "pread": (READ, lambda buf, offset, *_: (offset, len(buf))),
    "pread_sparse": (READ, lambda buf, offset, *_: (offset, len(buf))),
    "pwrite": (WRITE, lambda buf, offset, *_: (offset, len(buf))),
    "trim": (WRITE, lambda offset, length, *_: (offset, length)),
    "zero": (WRITE, lambda offset, length, *_: (offset, length)),
}


def invalid(message: str) -> OSError:
    return OSError(errno.EINVAL, message)


class Area:
    """One area's counters (the kernel's dm_stat_percpu and dm_stat_shared, one CPU)."""

    __slots__ = ("ios", "merges", "sectors", "ticks", "io_ticks", "io_ticks_total",
                 "time_in_queue", "in_flight", "stamp", "histogram")

    def __init__(self, bins: int, now: int) -> None:
        self.ios = [0, 0]
        self.merges = [0, 0]
        self.sectors = [0, 0]
        self.ticks = [0, 0]
        self.io_ticks = [0, 0]
        self.io_ticks_total = 0
        self.time_in_queue = 0
        self.in_flight = [0, 0]
        self.stamp = now
        self.histogram = [0] * (bins + 1) if bins else []

    def round(self, now: int) -> None:
        """Charge the time since the last change to whatever was in flight through it."""
        difference = now - self.stamp
        if not difference:
            return
        reads, writes = self.in_flight
        if reads:
            self.io_ticks[READ] += difference
        if writes:
            self.io_ticks[WRITE] += difference
        if reads + writes:
            self.io_ticks_total += difference
            self.time_in_queue += (reads + writes) * difference
        self.stamp = now

    def clear(self) -> None:
        """Zero the counters (not what is in flight, which is a state, not a count)."""
        self.ios = [0, 0]
        self.merges = [0, 0]
        self.sectors = [0, 0]
        self.ticks = [0, 0]
        self.io_ticks = [0, 0]
        self.io_ticks_total = self.time_in_queue = 0
        self.histogram = [0] * len(self.histogram)

    def line(self, start: int, step: int) -> str:
        """One line of @stats_print: `start+step` and the 13 counters, then the histogram."""
        text = (f"{start}+{step} {self.ios[READ]} {self.merges[READ]} {self.sectors[READ]} "
                f"{self.ticks[READ]} {self.ios[WRITE]} {self.merges[WRITE]} "
                f"{self.sectors[WRITE]} {self.ticks[WRITE]} {sum(self.in_flight)} "
                f"{self.io_ticks_total} {self.time_in_queue} {self.io_ticks[READ]} "
                f"{self.io_ticks[WRITE]}")
        if self.histogram:
            text += " " + ":".join(map(str, self.histogram))
        return text + "\n"


class Region:
    def __init__(self, region_id: int, start: int, end: int, step: int, precise: bool,
                 bounds: list[int], program_id: str, aux_data: str) -> None:
        self.id = region_id
        self.start, self.end, self.step = start, end, step
        self.precise = precise
        self.bounds = bounds  # histogram boundaries, in the region's tick unit
        self.program_id = program_id
        self.aux_data = aux_data
        now = self.now()
        self.areas = [Area(len(bounds), now) for _ in range(-(-(end - start) // step))]

    def now(self) -> int:
        """The region's clock: ms (the kernel's jiffies, printed as ms) or ns if precise."""
        ns = time.monotonic_ns()
        return ns if self.precise else ns // 1_000_000

    def listing(self) -> str:
        """Its line of @stats_list."""
        text = (f"{self.id}: {self.start}+{self.end - self.start} {self.step} "
                f"{self.program_id} {self.aux_data}")
        if self.precise:
            text += " precise_timestamps"
        if self.bounds:
            text += " histogram:" + ",".join(map(str, self.bounds))
        return text + "\n"

    def span(self, first: int, end: int) -> range:
        """The indexes of the areas a request over sectors [first, end) falls in."""
        if end <= self.start or first >= self.end:
            return range(0)
        return range((max(first, self.start) - self.start) // self.step,
                     (min(end, self.end) - self.start - 1) // self.step + 1)

    def sectors_in(self, index: int, first: int, end: int) -> int:
        """How many of the sectors [first, end) are in area `index`."""
        lo = self.start + index * self.step
        return min(end, lo + self.step, self.end) - max(first, lo)


class DeviceStats:
    """The regions of one mapped device, and the counting of its requests."""

    def __init__(self) -> None:
        self.regions: list[Region] = []  # by id
        # Where the previous request ended, and its direction: a request that starts there
        # in the same direction counts as merged (the kernel keeps this per CPU).
        self._last_sector = -1
        self._last_rw = -1

    # Counting

    def begin(self, rw: int, offset: int, length: int) -> tuple[int, int, bool, int] | None:
        """A request starts; what `end` needs, or None if no region sees it."""
        sectors = -(-length // SECTOR)
        if not sectors:
            return None
        first = offset // SECTOR
        end = first + sectors
        merged = first == self._last_sector and (rw == WRITE) == (self._last_rw == WRITE)
        self._last_sector, self._last_rw = end, rw
        started = time.monotonic_ns()
        for region in self.regions:
            now = region.now()
            for index in region.span(first, end):
                area = region.areas[index]
                area.round(now)
                area.in_flight[rw] += 1
        return rw, first, merged, started

    def end(self, token: tuple[int, int, bool, int] | None, length: int) -> None:
        if token is None:
            return
        rw, first, merged, started = token
        end = first + -(-length // SECTOR)
        duration_ns = time.monotonic_ns() - started
        for region in self.regions:
            now = region.now()
            duration = duration_ns if region.precise else duration_ns // 1_000_000
            for index in region.span(first, end):
                area = region.areas[index]
                area.round(now)
                area.in_flight[rw] -= 1
                area.sectors[rw] += region.sectors_in(index, first, end)
                area.ios[rw] += 1
                area.merges[rw] += merged
                area.ticks[rw] += duration
                if region.bounds:
                    area.histogram[_bin(region.bounds, duration)] += 1

    def attach(self, dev: MappedDevice) -> None:
        """Count `dev`'s requests while it has regions, and not at all otherwise."""
        if self.regions:
            for name, (rw, extent) in COUNTED.items():
                if name not in vars(dev):
                    setattr(dev, name, self._counting(getattr(dev, name), rw, extent))
        else:
            for name in COUNTED:
                vars(dev).pop(name, None)

    def _counting(self, call: Callable[..., Awaitable[Any]], rw: int,
                  extent: Callable[..., tuple[int, int]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any) -> Any:
            offset, length = extent(*args)
            token = self.begin(rw, offset, length)
            try:
                return await call(*args)
            finally:
                self.end(token, length)
        return counted

    # The messages

    def message(self, words: list[str], device_sectors: int) -> str | None:
        """Answer one @stats_* message (its name in words[0], in any case); OSError with
        the kernel's errno otherwise: EINVAL for bad arguments, ENOENT for no such region."""
        name = words[0].lower()
        if name == "@stats_create":
            return self._create(words, device_sectors)
        if name in ("@stats_delete", "@stats_clear"):
            if len(words) != 2:
                raise invalid(f"Invalid parameters for message {words[0]}")
            region = self._find(_region_id(words[1], words[0]))
            if name == "@stats_delete":
                self.regions.remove(region)
                return None
            for area in region.areas:
                area.clear()
            return ""
        if name == "@stats_list":
            if len(words) > 2:
                raise invalid(f"Invalid parameters for message {words[0]}")
            program = words[1] if len(words) > 1 else None
            return "".join(r.listing() for r in self.regions
                           if program is None or r.program_id == program)
        if name in ("@stats_print", "@stats_print_clear"):
            return self._print(words, clear=name == "@stats_print_clear")
        if name == "@stats_set_aux":
            if len(words) != 3:
                raise invalid(f"Invalid parameters for message {words[0]}")
            self._find(_region_id(words[1], words[0])).aux_data = words[2]
            return None
        raise invalid(f"Unsupported message sent to DM core: {words[0]}")

    def _find(self, region_id: int) -> Region:
        for region in self.regions:
            if region.id == region_id:
                return region
        raise OSError(errno.ENOENT, f"no statistics region {region_id}")

    def _create(self, words: list[str], device_sectors: int) -> str:
        """<range> <step> [<count> <features>...] [<program_id> [<aux_data>]]"""
        bad = invalid(f"Invalid parameters for message {words[0]}")
        if len(words) < 3:
            raise bad
        if words[1] == "-":
            start, length = 0, device_sectors or 1
        else:
            start_text, plus, length_text = words[1].partition("+")
            if not (plus and start_text.isdigit() and length_text.isdigit()):
                raise bad
            start, length = int(start_text), int(length_text)
        end = start + length
        if start >= end:
            raise bad
        step_text = words[2]
        if step_text.startswith("/") and step_text[1:].isdigit():
            divisor = int(step_text[1:])
            if not divisor:
                raise bad
            step = max(-(-(end - start) // divisor), 1)
        elif step_text.isdigit() and int(step_text):
            step = int(step_text)
        else:
            raise bad
        rest = words[3:]
        precise, bounds = False, list[int]()
        if rest and rest[0].isdigit():
            count, rest = int(rest[0]), rest[1:]
            if count > len(rest):
                raise bad
            for feature in rest[:count]:
                if feature.lower() == "precise_timestamps":
                    precise = True
                elif feature[:10].lower() == "histogram:" and not bounds:
                    bounds = _histogram(feature[10:], bad)
                else:
                    raise bad
            rest = rest[count:]
        if len(rest) > 2:
            raise bad
        program_id = rest[0] if rest else "-"
        aux_data = rest[1] if len(rest) > 1 else "-"
        if -(-(end - start) // step) > MAX_AREAS:
            raise OSError(errno.ENOMEM, f"{words[0]}: too many areas")
        region_id = 0  # the lowest id not in use, as the kernel hands them out
        for region in self.regions:
            if region.id != region_id:
                break
            region_id += 1
        self.regions.insert(region_id, Region(region_id, start, end, step, precise, bounds,
                                              program_id, aux_data))
        return str(region_id)

    def _print(self, words: list[str], clear: bool) -> str:
        if len(words) not in (2, 4):
            raise invalid(f"Invalid parameters for message {words[0]}")
        region = self._find(_region_id(words[1], words[0]))
        first, count = 0, len(region.areas)
        if len(words) == 4:
            for n, word in enumerate(words[2:4]):
                if word != "-":
                    if not word.isdigit():
                        raise invalid(f"Invalid parameters for message {words[0]}")
                    if n == 0:
                        first = int(word)
                    else:
                        count = int(word)
        stop = min(first + count, len(region.areas))
        first = min(first, stop)
        now = region.now()
        out = []
        for index in range(first, stop):
            area = region.areas[index]
            area.round(now)
            out.append(area.line(region.start + index * region.step, region.step))
            if clear:
                area.clear()
        return "".join(out)


def _region_id(word: str, message: str) -> int:
    if not word.isdigit():
        raise invalid(f"Invalid parameters for message {message}")
    return int(word)


def _histogram(text: str, bad: OSError) -> list[int]:
    """histogram:B1,B2,...: strictly increasing boundaries, at least one."""
    bounds: list[int] = []
    for word in text.split(","):
        if not word.isdigit() or (bounds and int(word) <= bounds[-1]) or int(word) == 0:
            raise bad
        bounds.append(int(word))
    return bounds


def _bin(bounds: list[int], duration: int) -> int:
    """The histogram bin of a latency: bin i holds bounds[i-1] <= duration < bounds[i]."""
    lo, hi = 0, len(bounds) + 1
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if bounds[mid - 1] > duration:
            hi = mid
        else:
            lo = mid
    return lo
