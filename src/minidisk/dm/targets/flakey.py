"""`flakey <dev> <off> <up_s> <down_s> [<#features> <features>...]`, as Linux 6.1 has it
(dm-flakey 1.5.0, DOC/dm-flakey.rst of that release).

Up for `up_s` seconds, then down for `down_s`, counted from table load (on the target's
`Clock`, dm/clock.py). While up, I/O
passes through. While down:

- `drop_writes`: writes (and trims, zeroes, flushes) succeed without reaching the device;
  reads pass;
- `error_writes`: writes (and trims, zeroes, flushes) fail with EIO; reads pass;
- `corrupt_bio_byte <N> <r|w> <value> <flags>`: byte N (1-based) of each matching read
  (after it completes) or write (in a copy, before it is sent) becomes `value`; other I/O
  passes. Our requests carry no bio flags, so only `flags` 0 matches;
- no features at all (or a feature count of 0): every request fails.

6.1 has neither `error_reads` nor `random_read_corrupt`/`random_write_corrupt` (later
kernels): they are refused as unknown features, as 6.1 refuses them. Its argument rules:
the feature count is 0..6 and may not exceed the words that follow; only that many are
read (more words after them are ignored); `drop_writes` and `error_writes` exclude each
other, `drop_writes` a write corruption, and a feature given twice is refused. The table
prints the features back in 6.1's order and form (`... <#> [drop_writes|error_writes]
[corrupt_bio_byte N d v f] `, with its trailing space).
"""

from __future__ import annotations

import errno
from dataclasses import replace

from minidisk.dm.clock import MONOTONIC, Clock
from minidisk.dm.status_table import CorruptBioByte, FlakeyTable
from minidisk.dm.target import TargetContext, TargetError, WindowTarget, parse_uint


def _down_error() -> OSError:
    return OSError(errno.EIO, "flakey device is down")


class Flakey(WindowTarget):
    name = "flakey"
    version = (1, 5, 0)

    def __init__(self, ctx: TargetContext, args: list[str], clock: Clock = MONOTONIC) -> None:
        super().__init__(ctx, args)
        if len(args) < 4:
            raise TargetError("Invalid argument count: expected <dev> <offset> <up> <down> ...")
        self.up = parse_uint(args[2], "Invalid up interval", 2**32 - 1)
        self.down = parse_uint(args[3], "Invalid down interval", 2**32 - 1)
        if self.up + self.down == 0:
            raise TargetError("Total (up + down) interval is zero")
        self.error_reads = False
        self.drop_writes = False
        self.error_writes = False
        self.error_writes_all = False  # no features: writes fail too (6.1's default)
        self.corrupt_byte = 0  # 1-based; 0 = feature off
        self.corrupt_write = False
        self.corrupt_value = 0
        self.corrupt_flags = 0
        self._parse_features(args[4:])
        self.open_window(ctx, args[0], args[1])
        # No extents: a server skips reading holes, and every read here must reach this
        # target (to fail or be corrupted).
        self.caps = replace(self.caps, extents=False)
        self.clock = clock
        self.started = clock.monotonic()

    def _parse_features(self, args: list[str]) -> None:
        if args:
            count = parse_uint(args[0], "Invalid number of feature args", 6)
            if count > len(args) - 1:
                raise TargetError("Invalid number of feature args")
            words = args[1:1 + count]
        else:
            words = []
        while words:
            feature = words.pop(0)
            if feature.lower() in ("drop_writes", "error_writes"):
                name = feature.lower()
                if getattr(self, name):
                    raise TargetError(f"Feature {name} duplicated")
                other = "error_writes" if name == "drop_writes" else "drop_writes"
                if getattr(self, other):
                    raise TargetError(f"Feature {name} conflicts with feature {other}")
                setattr(self, name, True)
            elif feature.lower() == "corrupt_bio_byte":
                if len(words) < 4:
                    raise TargetError("Feature corrupt_bio_byte requires parameters")
                nth, direction, value, flags = words[:4]
                del words[:4]
                self.corrupt_byte = parse_uint(nth, "Invalid corrupt bio byte", 2**32 - 1)
                if self.corrupt_byte == 0:
                    raise TargetError("Invalid corrupt bio byte")
                if direction.lower() not in ("r", "w"):
                    raise TargetError("Invalid corrupt bio direction (r or w)")
                self.corrupt_write = direction.lower() == "w"
                self.corrupt_value = parse_uint(
                    value, "Invalid corrupt value to write into bio byte (0-255)", 255)
                self.corrupt_flags = parse_uint(flags, "Invalid corrupt bio flags mask",
                                                2**32 - 1)
            else:
                raise TargetError("Unrecognised flakey feature requested")
        if (self.drop_writes or self.error_writes) and self.corrupt_byte and self.corrupt_write:
            flag = "drop_writes" if self.drop_writes else "error_writes"
            raise TargetError(
                f"{flag} is incompatible with corrupt_bio_byte with the WRITE flag set")
        if not (self.drop_writes or self.error_writes or self.corrupt_byte):
            self.error_reads = self.error_writes_all = True

    def status_table(self) -> FlakeyTable:
        # 6.1 counts corrupt_bio_byte as 5 words and ends the line with a space (the
        # datum's words do both)
        corrupt = CorruptBioByte(self.corrupt_byte, "w" if self.corrupt_write else "r",
                                 self.corrupt_value, self.corrupt_flags) \
            if self.corrupt_byte else None
        return FlakeyTable(self.ref.key, self.start, self.up, self.down, self.drop_writes,
                           self.error_writes, corrupt)

    def is_down(self) -> bool:
        elapsed = int(self.clock.monotonic() - self.started)
        return elapsed % (self.up + self.down) >= self.up

    def _write_allowed_down(self) -> bool:
        """For a write while down: True = send it, False = drop it; raises for error."""
        if self.drop_writes:
            return False
        if self.error_writes or self.error_writes_all:
            raise _down_error()
        return True

    def _corrupt(self, buf: memoryview | bytearray, write: bool) -> None:
        if self.corrupt_byte and self.corrupt_write == write and self.corrupt_flags == 0:
            if self.corrupt_byte <= len(buf):
                buf[self.corrupt_byte - 1] = self.corrupt_value

    async def pread(self, buf: memoryview, offset: int) -> None:
        if not self.is_down():
            await self.child.pread(buf, offset + self.base)
            return
        if self.error_reads:
            raise _down_error()
        await self.child.pread(buf, offset + self.base)
        self._corrupt(buf, write=False)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if self.is_down():
            if not self._write_allowed_down():
                return
            if self.corrupt_write:
                copy = bytearray(buf)  # never change the caller's buffer
                self._corrupt(copy, write=True)
                buf = memoryview(copy)
        await self.child.pwrite(buf, offset + self.base, fua)

    async def flush(self) -> None:
        if self.is_down() and not self._write_allowed_down():
            return
        if self.child.caps.flush:
            await self.child.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.is_down() and not self._write_allowed_down():
            return
        await self.child.trim(offset + self.base, length, fua)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        if self.is_down() and not self._write_allowed_down():
            return
        await self.child.zero(offset + self.base, length, may_trim, fast, fua)
