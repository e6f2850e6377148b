"""`snapshot-origin`, `snapshot` and `snapshot-merge`, as Linux 6.1 has them (MD/dm-snap.c,
DOC/snapshot.rst); the COW store's formats are in `cowstore.py`.

    snapshot-origin <origin>
    snapshot <origin> <cow> <P|PO|N> <chunk_sectors> [<#feat> discard_zeroes_cow
                                                       [discard_passdown_origin]]
    snapshot-merge <origin> <cow> <P|PO> <chunk_sectors> [<#feat> ...]

Every snapshot registers with its origin device (an `Origin`, the kernel's `struct origin`,
one per device whoever opened it). A write through `snapshot-origin` (or one that
`snapshot-merge` sends to the origin) is cut at the origin's split boundary, and each piece
first copies the chunk it starts in into every active, valid, non-merging snapshot of that
device that has no exception for it yet, and only then goes to the origin. A snapshot reads
a chunk from its COW device where it has an exception and from the origin elsewhere; a
write to it allocates an exception first (copying the origin's chunk unless the write
covers the whole chunk).

A COW store that fills on an origin write invalidates the snapshot (header valid 0, an
event, all its I/O fails: `Invalid`), P or PO alike; one that fills on a write to the
snapshot invalidates a `P` snapshot, and a `PO` one becomes `Overflow` (writes fail, reads
go on). A copy or metadata error invalidates it too.

A snapshot becomes active when its table is resumed; origin writes in flight are drained
first and new ones held meanwhile (the kernel suspends the origin's mapped device internally
for that, so 6.1 loads and resumes a snapshot beside a live origin without complaint). The
split boundary is the smallest chunk size of the origin's snapshots, computed when the
origin is resumed: so the origin must be suspended and resumed once its snapshots are
loaded (as LVM does), or a write spanning chunks of a snapshot with smaller chunks than the
origin knows of reaches the origin with only its first chunk copied out. 6.1 does exactly
that (seen in the guest), and so does this.

A snapshot table loaded while another table with the same COW device is active takes its
exceptions over at resume (a reload), and the old one becomes invalid; `snapshot-merge`
loaded into the origin's device takes them from the snapshot the same way (or, with no
snapshot table of that COW, reads them) and copies them back to the origin, newest run of
consecutive chunks first, each step committed to the store before the next, while I/O
goes on: writes to chunks being merged wait for the step. The kernel refuses the handover
while the old snapshot's device is not suspended; here it is done at once (a resume cannot
fail here without losing the table).

Status: `<allocated>/<total> <metadata>` sectors, or `Invalid`, `Merge failed`, `Overflow`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace

from minidisk.dm.cowstore import ExceptionStore, StoreError, create_store
from minidisk.dm.route import Hop, unwrap
from minidisk.dm.snapshot_origins import (
    ChunkCounts,
    Origin,
    hold_origin,
    identity,
    open_device,
    release_origin,
    split,
)
from minidisk.dm.status import SnapshotStatus
from minidisk.dm.status_table import SnapshotTable
from minidisk.dm.target import (
    DeviceRef,
    Target,
    TargetContext,
    TargetError,
    combine_caps,
    flush_device,
)

log = logging.getLogger(__name__)


def _eio(why: str) -> OSError:
    return OSError(errno.EIO, why)


async def _then(first: Callable[[], Awaitable[None]],
                second: Callable[[], Awaitable[None]]) -> None:
    await first()
    await second()


FEATURES = ("discard_zeroes_cow", "discard_passdown_origin")


class Snapshot(Target):
    name = "snapshot"
    version = (1, 16, 0)
    merge = False

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) < 4:
            raise TargetError("requires 4 or more arguments")
        self.features = self._parse_features(args[4:])
        self.raise_event = ctx.raise_event
        self.origin_ref = open_device(ctx, args[0], None, "Cannot get origin device")
        self.cow_ref = open_device(ctx, args[1], 0, "Cannot get COW device")
        self.origin_dev = self.origin_ref.device
        self.cow = self.cow_ref.device
        if identity(self.origin_dev) is identity(self.cow):
            raise TargetError("COW device cannot be the same as origin device")
        try:
            self.store: ExceptionStore = create_store(args[2], args[3], self.cow,
                                                      self.origin_dev)
        except StoreError as e:
            log.error("snapshot: %s", e)
            raise TargetError("Couldn't create exception store") from None
        if self.merge and not self.store.supports_merge:
            raise TargetError("Snapshot exception store does not support snapshot-merge.")
        caps = combine_caps([self.origin_dev.caps, self.cow.caps])
        self.caps = replace(caps, extents=False, fast_zero=False,
                            trim="discard_zeroes_cow" in self.features)
        self.block_size = max((self.origin_dev.block_size, self.cow.block_size),
                              key=lambda b: b.minimum)
        self.valid = True
        self.overflowed = False
        self.active = False
        self.merge_failed = False
        self.complete: dict[int, int] = {}  # old chunk -> new chunk
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.reads = ChunkCounts()  # snapshot reads of the origin, per chunk
        self.writes = ChunkCounts()  # writes to COW chunks (what a merge step waits for)
        self.origin: Origin | None = None
        self.handover_from: Snapshot | None = None
        # Exceptions are committed in the order their chunks were allocated.
        self._allocated = 0
        self._committed = 0
        self._turn = asyncio.Event()
        self._cow_gate, self._cow_device = unwrap(self.cow)
        # route.py: the COW device tells its holes; a merge counts the writes it waits for.
        self.routable = not self.merge and self.cow.caps.extents

    def route(self, offset: int, length: int) -> Hop | None:
        """A read or write inside one chunk whose exception is complete goes straight to
        its COW chunk (route.py): both go there, so the hop does not depend on which it
        is. Chunks without one (reads go to the origin, writes make the exception) and
        anything once the snapshot is invalid or overflowed come to pread and pwrite."""
        if not self.valid or self.overflowed:
            return None
        cb = self.store.chunk_bytes
        chunk, inside = divmod(offset, cb)
        if inside + length > cb:
            return None
        new = self.complete.get(chunk)
        if new is None:
            return None
        return self._cow_gate, self._cow_device, new * cb + inside, 0

    @staticmethod
    def _parse_features(words: list[str]) -> list[str]:
        if not words:
            return []
        if not words[0].isdigit() or int(words[0]) > 2 or int(words[0]) > len(words) - 1:
            raise TargetError("Invalid number of feature arguments")
        found: list[str] = []
        for word in words[1:1 + int(words[0])]:
            if word.lower() not in FEATURES:
                raise TargetError("Unrecognised feature requested")
            found.append(word.lower())
        if "discard_passdown_origin" in found and "discard_zeroes_cow" not in found:
            raise TargetError("discard_passdown_origin feature depends on discard_zeroes_cow")
        return found

    # Load, resume, unload

    async def prepare(self) -> None:
        origin = hold_origin(self.origin_dev)
        try:
            self._register(origin)
        except TargetError:
            release_origin(origin)
            raise
        self.origin = origin
        if self.handover_from is not None:
            # The active table's exceptions come over at resume; until then the kernel's
            # store has no chunk size (its table and status say 0).
            self.store.chunk_size = 0
            return
        try:
            valid, exceptions = await self.store.read_metadata()
        except (OSError, StoreError) as e:
            log.warning("snapshot: %s", e)
            raise TargetError("Failed to read snapshot metadata",
                              e.errno or errno.EIO) from None
        if not valid:
            self.valid = False
            log.warning("Snapshot is marked invalid.")
        if not self.store.chunk_size:
            raise TargetError("Chunk size not set")
        self.complete.update(exceptions)

    def _register(self, origin: Origin) -> None:
        """The kernel's register_snapshot: find the table this one takes over from."""
        cow = identity(self.cow)
        sharing = [s for s in origin.snapshots if identity(s.cow) is cow]
        sources = [s for s in sharing if s.active]
        if len(sharing) == 2 or len(sharing) > len(sources):
            raise TargetError("Snapshot cow pairing for exception table handover failed")
        if sources and self.merge:
            if any(s.merge for s in origin.snapshots):
                raise TargetError("A snapshot is already merging.")
            if not sources[0].store.supports_merge:
                raise TargetError(
                    "Snapshot exception store does not support snapshot-merge.")
        self.handover_from = sources[0] if sources else None
        origin.insert(self)

    async def resume(self) -> None:
        origin = self.origin
        assert origin is not None
        await origin.quiesce(self._activate)
        if self.merge:
            self._start_merge()

    def _activate(self) -> None:
        source, self.handover_from = self.handover_from, None
        if source is not None:
            overflow = self.store.overflow  # the new table's P or PO holds
            self.store, source.store = source.store, self.store
            self.store.overflow = overflow
            self.complete, source.complete = source.complete, self.complete
            self.valid, self.overflowed = source.valid, source.overflowed
            source.valid = False  # it gets no more I/O
        assert self.origin is not None
        self.origin.insert(self)  # the chunk size may have changed: keep the order
        self.active = True

    async def destroy(self) -> None:
        await self._stop_merge()
        origin, self.origin = self.origin, None
        if origin is not None:
            if self in origin.snapshots:
                origin.snapshots.remove(self)
            for dest in origin.snapshots:
                if dest.handover_from is self:  # its exceptions are gone with this table
                    log.error("Cancelling snapshot handover.")
                    dest.handover_from = None
                    dest.valid = False
            release_origin(origin)
        for waiting in list(self.pending.values()):
            await asyncio.shield(waiting)

    def status_table(self) -> SnapshotTable:
        persistent = self.store.table_args()[0]  # P, PO or N
        return SnapshotTable(self.origin_ref.key, self.cow_ref.key, persistent,
                             self.store.chunk_size, tuple(self.features))

    def status_info(self) -> SnapshotStatus:
        if not self.valid:
            return SnapshotStatus("Invalid")
        if self.merge_failed:
            return SnapshotStatus("Merge failed")
        if self.overflowed:
            return SnapshotStatus("Overflow")
        total, allocated, metadata = self.store.usage()
        return SnapshotStatus(None, allocated, total, metadata)

    def devices(self) -> list[DeviceRef]:
        return [self.origin_ref, self.cow_ref]

    # Exceptions

    async def invalidate(self, err: int) -> None:
        if not self.valid:
            return
        if err == errno.EIO:
            log.error("Invalidating snapshot: Error reading/writing.")
        else:
            log.error("Invalidating snapshot: Unable to allocate exception.")
        self.valid = False
        await self.store.drop()
        self.raise_event()

    async def _allocate(self, chunk: int) -> tuple[int | None, bool]:
        """Wait out an exception in flight for `chunk`, then (its COW chunk, False) if it
        has one, (None, False) if the snapshot is invalid, else (a COW chunk prepared for
        it, or None if the store is full; True)."""
        while True:
            new = self.complete.get(chunk)
            if new is not None or not self.valid:
                return new, False
            waiting = self.pending.get(chunk)
            if waiting is None:
                return self.store.prepare(), True
            await asyncio.shield(waiting)

    async def exception_for_origin(self, chunk: int) -> None:
        """Before an origin write: make sure `chunk` has been copied out (never raises; a
        snapshot that cannot take the copy is invalidated and the write goes on)."""
        new, fresh = await self._allocate(chunk)
        if not fresh:
            return
        if new is None:
            await self.invalidate(errno.ENOMEM)
            return
        await self._make_exception(chunk, new, None)

    async def _exception_for_write(self, chunk: int, whole: memoryview | None,
                                   fua: bool) -> int | None:
        """The COW chunk a write to the snapshot goes to; None if `whole` (the write, which
        covers the chunk) was written as the exception's data."""
        new, fresh = await self._allocate(chunk)
        if not fresh:
            if new is None:
                raise _eio("snapshot is invalid")
            return new
        if new is None:
            if self.store.overflow:
                if self.valid and not self.overflowed:
                    self.overflowed = True
                    log.error("Snapshot overflowed: Unable to allocate exception.")
            else:
                await self.invalidate(errno.ENOMEM)
            raise _eio("COW store is full")
        await self._make_exception(chunk, new, whole, fua)
        made = self.complete.get(chunk)
        if made is None:
            raise _eio("snapshot exception failed")
        return None if whole is not None else made

    async def _make_exception(self, chunk: int, new: int, whole: memoryview | None,
                              fua: bool = False) -> None:
        """Copy the origin's chunk (or write `whole`) to COW chunk `new`, commit, and let
        the reads of the origin's chunk drain before an origin write may overwrite it."""
        seq = self._allocated
        self._allocated += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[chunk] = done
        try:
            cb = self.store.chunk_bytes
            copied = True
            try:
                if whole is not None:
                    await self.cow.pwrite(whole, new * cb, fua)
                else:
                    await self._copy_chunk(chunk, new)
            except OSError as e:
                log.error("snapshot: copying chunk %d failed: %s", chunk, e)
                copied = False
            while self._committed != seq:
                await self._turn.wait()
            try:
                success = await self.store.commit(chunk, new, copied)
            finally:
                self._committed += 1
                self._turn.set()
                self._turn = asyncio.Event()
            if not success:
                await self.invalidate(errno.EIO)
            elif self.valid:
                self.complete[chunk] = new
                await self.reads.drained(chunk)
        finally:
            del self.pending[chunk]
            done.set_result(None)

    async def _copy_chunk(self, chunk: int, new: int) -> None:
        cb = self.store.chunk_bytes
        start = chunk * cb
        count = min(cb, self.origin_dev.size - start)
        if count <= 0:
            return
        buf = bytearray(count)
        await self.origin_dev.pread(memoryview(buf), start)
        await self.cow.pwrite(memoryview(buf), new * cb)

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(chunk, offset in chunk, position in request, bytes) for each chunk touched."""
        cb = self.store.chunk_bytes
        pos = 0
        while pos < length:
            chunk, inside = divmod(offset + pos, cb)
            n = min(cb - inside, length - pos)
            yield chunk, inside, pos, n
            pos += n

    # I/O

    async def pread(self, buf: memoryview, offset: int) -> None:
        if not self.valid:  # (a table that handed its exceptions over has no chunk size)
            raise _eio("snapshot is invalid")
        cb = self.store.chunk_bytes
        complete = self.complete
        first, inside = divmod(offset, cb)
        last = (offset + len(buf) - 1) // cb
        chunk, pos = first, 0
        # One read per run of chunks: chunks whose exceptions follow each other in the COW
        # device (as writes in order allocate them), or chunks that have none (the origin's).
        # A 1 MiB read of 8 KiB chunks is then a few reads, not 128.
        while chunk <= last:
            if not self.valid:
                raise _eio("snapshot is invalid")
            new = complete.get(chunk)
            end = chunk + 1
            if new is not None:
                while end <= last and complete.get(end) == new + end - chunk:
                    end += 1
            else:
                while end <= last and end not in complete:
                    end += 1
            n = min(end * cb - offset, len(buf)) - pos
            at = inside if chunk == first else 0
            piece = buf[pos:pos + n]
            if new is not None:
                await self.cow.pread(piece, new * cb + at)
            else:
                # Entered together, with no await since each was found without an exception:
                # an origin write copies a chunk out only once its reads have left.
                for c in range(chunk, end):
                    self.reads.enter(c)
                try:
                    await self.origin_dev.pread(piece, chunk * cb + at)
                finally:
                    for c in range(chunk, end):
                        self.reads.leave(c)
            chunk, pos = end, pos + n

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        """Chunk by chunk, but one write of the COW device for each run of chunks whose
        exceptions follow each other there (as writes in order allocate them): a 1 MiB
        write over 8 KiB chunks that have their exceptions is then one write, not 128.
        A chunk without one gets it first (`_exception_for_write`)."""
        if not self.valid or self.overflowed:
            raise _eio("snapshot is invalid or overflowed")
        cb = self.store.chunk_bytes
        complete = self.complete
        first, inside = divmod(offset, cb)
        last = (offset + len(buf) - 1) // cb
        chunk, pos = first, 0
        while chunk <= last:
            if not self.valid or self.overflowed:
                raise _eio("snapshot is invalid or overflowed")
            new = complete.get(chunk)
            end = chunk + 1
            if new is not None:
                while end <= last and complete.get(end) == new + end - chunk:
                    end += 1
            n = min(end * cb - offset, len(buf)) - pos
            at = inside if chunk == first else 0
            piece = buf[pos:pos + n]
            if new is None:
                new = await self._exception_for_write(chunk, piece if n == cb else None, fua)
            if new is not None:
                for c in range(chunk, end):  # what a merge step waits for
                    self.writes.enter(c)
                try:
                    await self.cow.pwrite(piece, new * cb + at, fua)
                finally:
                    for c in range(chunk, end):
                        self.writes.leave(c)
            chunk, pos = end, pos + n

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """discard_zeroes_cow: a discard of a whole chunk with an exception zeroes it on the
        COW device, other discards of the snapshot do nothing; with
        discard_passdown_origin the origin is discarded too."""
        cb = self.store.chunk_bytes
        if not self.valid or self.overflowed:
            raise _eio("snapshot is invalid or overflowed")
        for chunk, inside, _, n in self.pieces(offset, length):
            new = self.complete.get(chunk)
            if new is not None and n == cb:
                await self.cow.zero(new * cb, cb, fua=fua)
            elif new is not None and self.cow.caps.trim:  # remapped to the COW device
                await self.cow.trim(new * cb + inside, n, fua)
        if "discard_passdown_origin" in self.features and self.origin_dev.caps.trim:
            await self.origin_dev.trim(offset, length, fua)

    async def flush(self) -> None:
        await flush_device(self.cow)

    # Merging (snapshot-merge only)

    def _start_merge(self) -> None:
        """snapshot-merge's; a snapshot does not merge."""

    async def _stop_merge(self) -> None:
        """snapshot-merge's."""


class SnapshotMerge(Snapshot):
    """A snapshot-origin and the snapshot being merged into it in one: chunks with an
    exception are read and written on the COW device until merged, the rest on the origin
    (copying out to the origin's other snapshots first)."""

    name = "snapshot-merge"
    version = (1, 5, 0)
    merge = True

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        self.merging: tuple[int, int] = (0, 0)  # first chunk, count
        self.boundary = 0  # max_io_len: the origin's split boundary, set at resume
        self._merged = asyncio.Event()  # set (and replaced) after every merge step
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def _in_merge(self, chunk: int) -> bool:
        first, count = self.merging
        return first <= chunk < first + count

    def _origin(self) -> Origin:
        assert self.origin is not None
        return self.origin

    async def pread(self, buf: memoryview, offset: int) -> None:
        cb = self.store.chunk_bytes
        for chunk, inside, pos, n in self.pieces(offset, len(buf)):
            piece = buf[pos:pos + n]
            new = self.complete.get(chunk) if self.valid else None
            if new is not None:
                await self.cow.pread(piece, new * cb + inside)
            else:
                await self.origin_dev.pread(piece, chunk * cb + inside)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        cb = self.store.chunk_bytes
        # Split at the origin's split boundary (no larger than this store's chunk).
        for at, pos, n in split(offset, len(buf), self.boundary):
            piece = buf[pos:pos + n]
            chunk = at // cb
            while self.valid and self._in_merge(chunk):
                await self._merged.wait()  # queued until the step that merges it is done
            new = self.complete.get(chunk) if self.valid else None
            if new is not None:
                self.writes.enter(chunk)
                try:
                    await self.cow.pwrite(piece, new * cb + at % cb, fua)
                finally:
                    self.writes.leave(chunk)
                continue
            await self._write_origin(piece, at, fua)

    async def _write_origin(self, piece: memoryview, at: int, fua: bool) -> None:
        await self._origin().write(at, lambda: self.origin_dev.pwrite(piece, at, fua))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Once merging, discards no longer effect change (as the kernel's)."""

    async def flush(self) -> None:
        await flush_device(self.origin_dev)
        await flush_device(self.cow)

    def _start_merge(self) -> None:
        self.boundary = self._origin().split_boundary()
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._merge())

    async def _stop_merge(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            await task

    async def presuspend(self, noflush: bool) -> None:
        await self._stop_merge()

    async def _merge(self) -> None:
        try:
            while not self._stopping:
                if not self.valid:
                    log.error("Snapshot is invalid: can't merge")
                    return
                try:
                    count, last_old, last_new = await self.store.prepare_merge()
                except OSError as e:
                    log.error("Read error in exception store: shutting down merge (%s)", e)
                    self.merge_failed = True
                    return
                if count <= 0:
                    return  # merged
                old, new = last_old + 1 - count, last_new + 1 - count
                if not await self._merge_step(old, new, count):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: report it as the kernel reports an I/O error
            log.exception("snapshot-merge: merge failed")
            self.merge_failed = True

    async def _merge_step(self, old: int, new: int, count: int) -> bool:
        cb = self.store.chunk_bytes
        at = old * cb
        length = min(count * cb, self.origin_dev.size - at)
        origin = self._origin()

        async def copy_back() -> None:
            self.merging = (old, count)
            await self.writes.drained(old, count)
            if length > 0:
                buf = bytearray(length)
                await self.cow.pread(memoryview(buf), new * cb)
                await self.origin_dev.pwrite(memoryview(buf), at)
            await flush_device(self.origin_dev)
            await self.store.commit_merge(count)
            for chunk in range(old, old + count):
                self.complete.pop(chunk, None)

        async def copy_out() -> None:  # the kernel's origin_write_extent
            for piece in range(at, at + count * cb, self.boundary):
                await origin.copy_out(piece)

        try:
            # Other snapshots of the origin get their copies of these chunks first.
            await origin.write(at, lambda: _then(copy_out, copy_back))
        except OSError as e:
            log.error("snapshot-merge: merging chunks %d+%d failed, shutting down merge: %s",
                      old, count, e)
            self.merge_failed = True
            return False
        finally:
            self.merging = (0, 0)
            self._merged.set()
            self._merged = asyncio.Event()
        return True

    async def wait_merged(self) -> None:
        """Until the merge has stopped (done, failed or suspended): for tests and tools."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)
