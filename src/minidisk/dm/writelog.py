"""The dm-log-writes on-disk log format, and replaying a log as xfstests' replay-log does.

Layout (MD/dm-log-writes.c; xfstests src/log-writes reads the same), little-endian, in
units of the logged device's sector size `ss` (512 here)::

    block 0        super  {le64 magic, le64 version = 1, le64 nr_entries, le32 sectorsize}
    block 1...     entries, each one header block then its data blocks:
                   header {le64 sector, le64 nr_sectors, le64 flags, le64 data_len}
                   + for a MARK, `data_len` bytes of mark text in the same block;
                   then nr_sectors * ss bytes of written data (none for DISCARD/FLUSH/MARK)

`sector` and `nr_sectors` are in `ss` units. The super's `nr_entries` is rewritten after
each FUA and MARK entry, so a reader trusts entries up to the last of those; the target
logs a final `dm-log-writes-end` mark when its table is dropped.

Reading and replaying follow xfstests' log-writes.c, which crash-consistency tests drive
and whose numbers scripts parse: a `LogCursor` walks the log in order (there is no index)
and counts positions in blocks as it does; a header block must look sane (not all zero, and
zero right after the 32-byte header unless it is a MARK), or the log is "malformed" there.
Replay writes data and discards and nothing else: FLUSH, FUA and MARK entries carry no data,
and the target is fsync'ed only at the end (and before each `--check` command).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

MAGIC = 0x6A736677736872
VERSION = 1

FLUSH = 1 << 0
FUA = 1 << 1
DISCARD = 1 << 2
MARK = 1 << 3
METADATA = 1 << 4

SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")

END_MARK = "dm-log-writes-end"

# What replay-log reads of a super and, while seeking, of a header: the C structs' sizes,
# padding included (a header's is 40: the byte after it, which validation looks at, and 7).
SUPER_READ = 32
HEADER_READ = 40

BLKDISCARD = 0x1277  # _IO(0x12, 119)
DISCARD_CHUNK = 1 << 30  # replay-log discards at most 1 GiB per call...
MAX_ZERO = 128 << 20  # ...and, where discard fails, zeroes a chunk only up to this size
COPY_CHUNK = 1 << 20

_FLAG_NAMES = ((FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"), (MARK, "MARK"),
               (METADATA, "METADATA"))


def encode_super(nr_entries: int, sectorsize: int) -> bytes:
    return SUPER.pack(MAGIC, VERSION, nr_entries, sectorsize).ljust(sectorsize, b"\0")


def encode_entry(sector: int, nr_sectors: int, flags: int, mark: bytes, sectorsize: int) -> bytes:
    header = ENTRY.pack(sector, nr_sectors, flags, len(mark)) + mark
    return header.ljust(sectorsize, b"\0")


def max_mark_length(sectorsize: int) -> int:
    """Longest mark text the kernel keeps (`kstrndup(data, maxsize - 1)`)."""
    return sectorsize - ENTRY.size - 1


def flag_names(flags: int) -> str:
    """Flags as replay-log prints them: `FLUSH|FUA`, `NONE`, `MARK|UNKNOWN.0x40`."""
    names = [name for bit, name in _FLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in _FLAG_NAMES)
    if rest:
        names.append(f"UNKNOWN.{rest:#x}")
    return "|".join(names) or "NONE"


class LogError(Exception):
    """The log cannot be read, or the target written: one line for stderr."""


def _os_error(what: str, e: OSError) -> LogError:
    # replay-log prints the bare errno; the name of it says what went wrong
    return LogError(f"{what}: {e.errno} ({e.strerror})")


@dataclass(frozen=True, slots=True)
class LogEntry:
    index: int
    sector: int  # in sectorsize units
    nr_sectors: int
    flags: int
    data_len: int
    text: bytes  # the header block after the 32-byte header: a MARK's text, then zeroes

    @property
    def mark(self) -> str | None:
        if not self.flags & MARK:
            return None
        return self.text[:self.data_len].split(b"\0")[0].decode(errors="replace")

    def is_mark(self, name: bytes) -> bool:
        """Is this the MARK `name`? As replay-log: `strncmp(name, text, data_len + 1)`, so
        the name must be the whole text, not a prefix of it."""
        if not self.flags & MARK:
            return False
        n = self.data_len + 1
        return name[:n] == self.text[:n].split(b"\0")[0]

    @property
    def has_data(self) -> bool:
        return self.nr_sectors > 0 and not self.flags & DISCARD


def matches(entry: LogEntry, stop_flags: int, mark: bytes | None) -> bool:
    """replay-log's stop test: any of `stop_flags`; when MARK is among them, only the mark
    `mark` counts (so `--end-mark` with `--next-flush` stops at the mark alone)."""
    if not entry.flags & stop_flags:
        return False
    if not stop_flags & MARK:
        return True
    return mark is not None and entry.is_mark(mark)


def _size_of(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device


class LogCursor:
    """A position in a log on a host file or device (replay-log's `struct log`): the next
    entry's number and the byte offset of its header block."""

    def __init__(self, fd: int, trace: Callable[[str], None] | None = None) -> None:
        """`trace`, when given, receives the lines replay-log prints at `-vv` while seeking."""
        self.fd = fd
        self.trace = trace
        self.size = _size_of(fd)
        head = self.read(SUPER_READ, 0, "Error reading super")
        magic, version, nr_entries, sectorsize = SUPER.unpack_from(head)
        self.nr_entries: int = nr_entries
        self.sectorsize: int = sectorsize
        if magic != MAGIC:
            raise LogError(f"Magic doesn't match: not a dm-log-writes log (magic {magic:#x})")
        if version != VERSION:
            raise LogError(f"Version mismatch, wanted {VERSION}, have {version}")
        ss = self.sectorsize
        # The kernel writes the log device's logical block size; anything else is not a log
        # (replay-log divides by it, and reads a header from each block).
        if ss < 512 or ss & (ss - 1):
            raise LogError(f"Bad sector size {ss} in the log's super")
        self.cur_entry = 0
        self.pos: int = ss

    @property
    def block(self) -> int:
        """The current position in sectorsize blocks: what replay-log prints after `@`."""
        return self.pos // self.sectorsize

    def read(self, length: int, offset: int, what: str) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise _os_error(what, e) from None
        if len(data) < length:
            raise LogError(f"{what}: {length} bytes at byte {offset} run past the end of the "
                           f"log ({self.size} bytes)")
        return data

    def _header(self, length: int) -> LogEntry:
        raw = self.read(length, self.pos, "Error reading entry")
        sector, nr_sectors, flags, data_len = ENTRY.unpack_from(raw)
        if (not flags and not nr_sectors) or (flags != MARK and raw[ENTRY.size] != 0):
            raise LogError(f"Malformed entry @{self.block} (entry {self.cur_entry})")
        return LogEntry(self.cur_entry, sector, nr_sectors, flags, data_len,
                        raw[ENTRY.size:])

    def seek(self, index: int) -> None:
        """Go to entry `index`, which must be in the log (so no entry of an empty log)."""
        if index >= self.nr_entries:
            raise LogError(f"Invalid entry number {index}: the log has {self.nr_entries} "
                           "entries")
        self.pos, self.cur_entry = self.sectorsize, 0
        while self.cur_entry < index:
            entry = self._header(HEADER_READ)
            if self.trace:  # the position is the header's, unlike next()'s
                self.trace(f"seek entry {entry.index}@{self.block}: {entry.sector}, size "
                           f"{entry.nr_sectors}, flags {entry.flags:#x}")
            self._step()
            self.pos += entry.nr_sectors * self.sectorsize if entry.has_data else 0

    def _step(self) -> None:
        self.cur_entry += 1
        self.pos += self.sectorsize

    def next_header(self) -> LogEntry | None:
        """Read the next entry's header and step past it (not past its data); None at the
        end of the log."""
        if self.cur_entry >= self.nr_entries:
            return None
        entry = self._header(self.sectorsize)
        self._step()
        return entry

    def next(self) -> LogEntry | None:
        """Step past the next entry, data and all (replay-log's log_seek_next_entry)."""
        entry = self.next_header()
        if entry is None:
            return None
        if self.trace:
            self.trace(f"seek entry {entry.index}@{self.block}: {entry.sector}, size "
                       f"{entry.nr_sectors}, flags {entry.flags:#x}({flag_names(entry.flags)})")
        if entry.has_data:
            self.pos += entry.nr_sectors * self.sectorsize
        return entry

    def seek_mark(self, name: bytes) -> None:
        """Go to the entry after the mark `name`."""
        while (entry := self.next()) is not None:
            if entry.is_mark(name):
                return
        raise LogError(f"Couldn't find starting mark {name.decode(errors='replace')!r}")


class Replayer:
    """Applies entries from a cursor onto a host file or block device opened for writing.

    Writes go where the entry says, past the end of a regular file too (replay-log opens
    the target O_WRONLY and pwrites). Discards are BLKDISCARD; on the first one that fails
    (a regular file, a device without discard) replay switches to writing zeroes for the
    rest of the run, but never zeroes more than 128 MiB at once (a larger discard is then
    skipped, as in replay-log). Entries outside [start_sector, end_sector] are skipped —
    except discards, which replay-log applies wherever they are, and so do we.
    """

    def __init__(
        self, log: LogCursor, fd: int, *, discard: bool = True, start_sector: int = 0,
        end_sector: int = (1 << 64) - 1, verbose: int = 0,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.log = log
        self.fd = fd
        self.discard = discard
        self.discard_works = True
        self.start_sector = start_sector
        self.end_sector = end_sector
        self.verbose = verbose
        self.echo = echo

    def outside(self, entry: LogEntry) -> bool:
        if not entry.nr_sectors:
            return False
        return (entry.sector + entry.nr_sectors <= self.start_sector
                or entry.sector > self.end_sector)

    def next(self) -> LogEntry | None:
        """Replay the next entry; None at the end of the log."""
        log = self.log
        entry = log.next_header()
        if entry is None:
            return None
        ss = log.sectorsize
        size = entry.nr_sectors * ss
        skip = self.outside(entry)
        if self.verbose > 1 or (self.verbose and not skip):
            self.echo(f"{'skipping' if skip else 'replaying'} {entry.index}@{log.block}: "
                      f"sector {entry.sector}, size {size}, flags {entry.flags:#x}"
                      f"({flag_names(entry.flags)})")
        if not size:
            return entry
        if entry.flags & DISCARD:
            self._discard(entry.sector * ss, size)
            return entry
        if not skip:
            self._copy(log.pos, entry.sector * ss, size, entry.index)
        log.pos += size
        return entry

    def _copy(self, src: int, dst: int, size: int, index: int) -> None:
        # All of the data is there before any of it is written, as replay-log reads it whole.
        if src + size > self.log.size:
            raise LogError(f"Error reading data: entry {index} runs past the end of the log "
                           f"({src + size} > {self.log.size} bytes)")
        done = 0
        while done < size:
            data = self.log.read(min(COPY_CHUNK, size - done), src + done, "Error reading data")
            self._write(data, dst + done, "Error writing data")
            done += len(data)

    def _write(self, data: bytes, offset: int, what: str) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                raise _os_error(what, e) from None
            if n == 0:
                raise _os_error(what, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            view, offset = view[n:], offset + n

    def _discard(self, start: int, size: int) -> None:
        if not self.discard:
            return
        while size:
            n = min(size, DISCARD_CHUNK)
            if self.discard_works:
                try:
                    fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", start, n))
                except OSError:
                    if self.verbose:
                        self.echo("replay device doesn't support discard, switching to "
                                  "writing zeros")
                    self.discard_works = False
            if not self.discard_works:
                self._zero(start, n)
            start, size = start + n, size - n

    def _zero(self, start: int, size: int) -> None:
        if size > MAX_ZERO:
            if self.verbose:
                self.echo(f"discard len {size} larger than max {MAX_ZERO}")
            return
        zeroes = bytes(min(size, COPY_CHUNK))
        done = 0
        while done < size:
            n = min(len(zeroes), size - done)
            self._write(zeroes[:n], start + done, "Error zeroing file")
            done += n

    def sync(self) -> None:
        os.fsync(self.fd)
