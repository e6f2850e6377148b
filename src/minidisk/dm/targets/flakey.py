"""`flakey <dev> <off> <up_s> <down_s> [<#features> <features>...]` (DOC/dm-flakey.rst).

Up for `up_s` seconds, then down for `down_s`, counted from table load. While up, I/O
passes through. While down:

- `error_reads`: reads fail with EIO; writes pass (unless a write feature says otherwise);
- `drop_writes`: writes (and trims, zeroes, flushes) succeed without reaching the device;
- `error_writes`: writes (and trims, zeroes, flushes) fail with EIO;
- `corrupt_bio_byte <N> <r|w> <value> <flags>`: byte N (1-based) of each matching read
  (after it completes) or write (in a copy, before it is sent) becomes `value`; other I/O
  passes. Our requests carry no bio flags, so only `flags` 0 matches;
- `random_read_corrupt P` / `random_write_corrupt P`: with probability P/1e9 one random
  byte of a read or a (copied) write is changed; other I/O passes;
- no features at all (or a feature count of 0): both `error_reads` and `error_writes`, so
  every request fails.

That last rule is how the kernel has put it since `error_reads` came in (dm-flakey 1.5):
the features are set for real, so `dmsetup table` prints a featureless table back as
`... 2 error_reads error_writes`, and that text loads back to the same target.
Conflicts are refused as the kernel refuses them: `drop_writes` with `error_writes`, either
of them with a write corruption, `error_reads` with a read corruption, and any feature
given twice.
"""

from __future__ import annotations

import errno
import random
import time
from dataclasses import replace

from minidisk.dm.target import TargetContext, TargetError, WindowTarget, parse_uint

PROBABILITY_BASE = 1_000_000_000


def _down_error() -> OSError:
    return OSError(errno.EIO, "flakey device is down")


class Flakey(WindowTarget):
    name = "flakey"
    version = (1, 5, 0)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
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
        self.corrupt_byte = 0  # 1-based; 0 = feature off
        self.corrupt_write = False
        self.corrupt_value = 0
        self.corrupt_flags = 0
        self.random_read = 0
        self.random_write = 0
        self._parse_features(args[4:])
        self.open_window(ctx, args[0], args[1])
        # No extents: a server skips reading holes, and every read here must reach this
        # target (to fail or be corrupted).
        self.caps = replace(self.caps, extents=False)
        self.started = time.monotonic()
        self._random = random.Random()

    def _parse_features(self, args: list[str]) -> None:
        words = args[1:]
        if args:
            count = parse_uint(args[0], "Invalid number of feature args", 11)
            if len(words) != count:
                raise TargetError(f"Invalid number of feature args: {count} declared, "
                                  f"{len(words)} given")
        while words:
            feature = words.pop(0).lower()
            if feature in ("error_reads", "drop_writes", "error_writes"):
                if getattr(self, feature):
                    raise TargetError(f"Feature {feature} duplicated")
                other = {"drop_writes": "error_writes", "error_writes": "drop_writes"}.get(
                    feature)
                if other is not None and getattr(self, other):
                    raise TargetError(f"Feature {feature} conflicts with feature {other}")
                setattr(self, feature, True)
            elif feature == "corrupt_bio_byte":
                if self.corrupt_byte:
                    raise TargetError("Feature corrupt_bio_byte duplicated")
                if len(words) < 4:
                    raise TargetError("Feature corrupt_bio_byte requires 4 parameters")
                nth, direction, value, flags = words[:4]
                del words[:4]
                self.corrupt_byte = parse_uint(nth, "Invalid corrupt bio byte", 2**32 - 1)
                if self.corrupt_byte == 0:
                    raise TargetError("Invalid corrupt bio byte: 0")
                if direction.lower() not in ("r", "w"):
                    raise TargetError("Invalid corrupt bio direction (r or w)")
                self.corrupt_write = direction.lower() == "w"
                self.corrupt_value = parse_uint(
                    value, "Invalid corrupt value to write into bio byte (0-255)", 255)
                self.corrupt_flags = parse_uint(flags, "Invalid corrupt bio flags mask",
                                                2**32 - 1)
            elif feature in ("random_read_corrupt", "random_write_corrupt"):
                which = "random_" + feature.split("_")[1]
                if getattr(self, which):
                    raise TargetError(f"Feature {feature} duplicated")
                if not words:
                    raise TargetError(f"Feature {feature} requires a parameter")
                setattr(self, which, parse_uint(words.pop(0), "Invalid random corrupt argument",
                                                PROBABILITY_BASE))
            else:
                raise TargetError(f"Unrecognised flakey feature requested: {feature}")
        writes_corrupted = bool(self.corrupt_byte and self.corrupt_write or self.random_write)
        reads_corrupted = bool(self.corrupt_byte and not self.corrupt_write or self.random_read)
        for flag, conflict, direction in (("drop_writes", writes_corrupted, "WRITE"),
                                          ("error_writes", writes_corrupted, "WRITE"),
                                          ("error_reads", reads_corrupted, "READ")):
            if getattr(self, flag) and conflict:
                raise TargetError(
                    f"{flag} is incompatible with random_{direction.lower()}_corrupt or "
                    f"corrupt_bio_byte with the {direction} flag set")
        if not (self.error_reads or self.drop_writes or self.error_writes or self._corrupts):
            self.error_reads = self.error_writes = True

    def _features(self) -> list[str]:
        out: list[str] = []
        if self.error_reads:
            out.append("error_reads")
        if self.drop_writes:
            out.append("drop_writes")
        elif self.error_writes:
            out.append("error_writes")
        if self.corrupt_byte:
            out += ["corrupt_bio_byte", str(self.corrupt_byte), "w" if self.corrupt_write else "r",
                    str(self.corrupt_value), str(self.corrupt_flags)]
        if self.random_read:
            out += ["random_read_corrupt", str(self.random_read)]
        if self.random_write:
            out += ["random_write_corrupt", str(self.random_write)]
        return out

    def table_args(self) -> list[str]:
        features = self._features()
        return [self.ref.key, str(self.start), str(self.up), str(self.down),
                str(len(features)), *features]

    def is_down(self) -> bool:
        elapsed = int(time.monotonic() - self.started)
        return elapsed % (self.up + self.down) >= self.up

    @property
    def _corrupts(self) -> bool:
        return bool(self.corrupt_byte or self.random_read or self.random_write)

    def _write_allowed_down(self) -> bool:
        """For a write while down: True = send it, False = drop it; raises for error."""
        if self.drop_writes:
            return False
        if self.error_writes:
            raise _down_error()
        return True

    def _corrupt(self, buf: memoryview | bytearray, write: bool) -> None:
        if self.corrupt_byte and self.corrupt_write == write and self.corrupt_flags == 0:
            if self.corrupt_byte <= len(buf):
                buf[self.corrupt_byte - 1] = self.corrupt_value
        chance = self.random_write if write else self.random_read
        if chance and len(buf) and self._random.randrange(PROBABILITY_BASE) < chance:
            # xor with a non-zero value so the chosen byte really changes
            at = self._random.randrange(len(buf))
            buf[at] ^= self._random.randrange(1, 256)

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
            if self.corrupt_write or self.random_write:
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
