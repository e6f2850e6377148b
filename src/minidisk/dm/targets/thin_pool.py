"""`thin-pool <metadata dev> <data dev> <block sectors> <low water blocks> [<#feat> <feat>...]`
(DOC/thin-provisioning.rst, MD/dm-thin.c), with the kernel's metadata format (dm/thin/).

The table's target is thin; what lasts is a `Pool`, found again by its metadata device
when the table is reloaded (as the kernel's pool table does), which thins (thin.py) find
through the pool's mapped device. I/O to the pool device itself goes to the data device.

Provisioning is the kernel's: a write to an unmapped block, or to one a snapshot still
shares, gets a new data block, zeroed (unless skip_block_zeroing) or filled from the old
block or the external origin, written, and only then mapped. A commit waits until no
provisioning is half done, so committed metadata never maps a block that was not written.
Commits happen on every FLUSH/FUA a thin gets, after every message, and once a second.
When the data device is full, writes that need a block wait for a resume that grows it,
or fail with ENOSPC after `no_space_timeout` (or at once with error_if_no_space). A
failed metadata write sets needs_check and leaves the pool read-only. After each commit
the free metadata blocks are checked as 6.1 does: one event at the threshold, and
out-of-metadata-space (shown as ro: no new blocks, no messages) when only the reserve is
left, until a reload over a bigger metadata device.

Differences from 6.1: the metadata is read at the first resume, not at load (our
constructors do no I/O), so a thin loaded before its pool first resumes is checked then;
and `status` shows the in-memory counts without committing first.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable

from minidisk.device.api import BlockDevice, BlockSize
from minidisk.dm.status import ThinPoolStatus
from minidisk.dm.status_table import ThinPoolTable
from minidisk.dm.table import SECTOR
from minidisk.dm.target import (
    DeviceRef,
    Target,
    TargetContext,
    TargetError,
    combine_caps,
    flush_device,
    parse_uint,
)
from minidisk.dm.thin.btree import MISSING, Missing
from minidisk.dm.thin.disk import BLOCK_SIZE
from minidisk.dm.thin.metadata import MAX_DEV_ID, PoolMetadata, metadata_blocks
from minidisk.dm.thin.spacemap import NoSpace

log = logging.getLogger(__name__)

MIN_BLOCK_SECTORS = 128
MAX_BLOCK_SECTORS = 2097152
COMMIT_PERIOD = 1.0
# dm-thin-pool's no_space_timeout module parameter: how long writes wait for space.
no_space_timeout = 60.0

RW, OUT_OF_DATA_SPACE, READ_ONLY, FAIL = "rw", "out_of_data_space", "ro", "Fail"
OUT_OF_METADATA_SPACE = "out_of_metadata_space"  # status shows it as ro
_NO_METADATA_CHANGES = (OUT_OF_METADATA_SPACE, READ_ONLY, FAIL)
_FEATURES = ("skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only",
             "error_if_no_space")


def _pool_error(message: str, err: int = errno.EIO) -> OSError:
    return OSError(err, message)


class Pool:
    """One pool's state across table reloads: metadata, mode, provisioning, commits."""

    def __init__(self, metadata: BlockDevice, data: BlockDevice, block_sectors: int) -> None:
        self.metadata_dev = metadata
        self.data = data
        self.block_sectors = block_sectors
        self.block_bytes = block_sectors * SECTOR
        self.md: PoolMetadata | None = None
        self.mode = RW
        self.users = 0  # pool targets constructed over it
        self.open_thins: dict[int, int] = {}
        self.highest: dict[int, int | None] = {}
        self.lock = asyncio.Lock()  # metadata
        self.gate = asyncio.Condition()  # provisioning vs commit
        self.provisions = 0
        self.committers = 0
        self.cells: dict[tuple[int, int], asyncio.Event] = {}
        # Thins whose changes an aborted transaction lost (6.1's aborted_with_changes): a
        # flush on one fails from then on, until the pool's metadata is opened afresh.
        self.aborted_with_changes: set[int] = set()
        self.space = asyncio.Event()  # set when writes waiting for space may retry
        self.low_water = 0
        self.low_water_triggered = False
        self.metadata_low = False  # below the metadata threshold: its event was raised
        self.error_if_no_space = False
        self.zero_new_blocks = True
        self.discard_enabled = True
        self.discard_passdown = True
        self.raise_event: Callable[[], None] = lambda: None
        self._ticker: asyncio.Task[None] | None = None

    # Opening, resizing, closing

    async def bind(self, target: ThinPool) -> None:
        """What pool_preresume and pool_resume do for `target`'s table."""
        self.raise_event = target.raise_event
        self.low_water = target.low_water
        self.error_if_no_space = target.error_if_no_space
        self.zero_new_blocks = target.zero_new_blocks
        self.discard_enabled = target.discard_enabled
        self.discard_passdown = target.discard_passdown
        async with self.lock:
            if self.md is None:
                md = PoolMetadata(self.metadata_dev, self.block_sectors)
                # read_only "cannot be specified on initial thin-pool creation" (the doc).
                await md.open(may_format=not target.read_only)
                self.md = md
                self.aborted_with_changes.clear()
                for dev_id in md.devices:
                    self.highest[dev_id] = await md.highest_mapped(dev_id)
                if md.needs_check:
                    log.warning("thin-pool: metadata needs_check is set: read-only")
                    self.mode = READ_ONLY
            md = self.md
            nr = target.length // self.block_sectors
            if nr < md.data.nr_blocks:
                raise _pool_error(f"pool target ({nr} blocks) too small: expected "
                                  f"{md.data.nr_blocks}", errno.EINVAL)
            if nr > md.data.nr_blocks and not md.needs_check:
                md.resize_data(nr)
            if metadata_blocks(self.metadata_dev) > md.meta.nr_blocks:
                md.meta.extend(metadata_blocks(self.metadata_dev))
                md.changed = True
            if target.read_only and self.mode != FAIL:
                self.mode = READ_ONLY
            elif self.mode in (READ_ONLY, OUT_OF_DATA_SPACE, OUT_OF_METADATA_SPACE) \
                    and not md.needs_check:
                self.mode = RW
            if self.mode == RW:
                await md.commit()
                self._check_metadata_space(md)
        self.low_water_triggered = False
        self.space.set()
        self.space = asyncio.Event()
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_PERIOD)
            try:
                await self.commit()
            except OSError:
                pass  # commit() has changed the mode already

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.md is not None and self.mode in (RW, OUT_OF_DATA_SPACE):
            await self.commit()
        self.md = None

    def metadata(self) -> PoolMetadata:
        if self.md is None:
            raise _pool_error("thin-pool: pool has not been resumed")
        return self.md

    # Modes

    def set_mode(self, mode: str) -> None:
        if mode != self.mode:
            log.warning("thin-pool: switching pool to %s mode", mode)
            self.mode = mode
            self.raise_event()

    async def metadata_failed(self, e: BaseException) -> None:
        """A metadata operation failed: drop the transaction, mark the metadata for
        repair, go read-only (or fail, if even that is impossible)."""
        log.error("thin-pool: metadata operation failed: %s", e)
        try:
            md = self.metadata()
            self.aborted_with_changes |= {d.id for d in md.devices.values() if d.changed}
            await md.set_needs_check()
            fresh = PoolMetadata(self.metadata_dev, self.block_sectors)
            await fresh.open()
            self.md = fresh
            self.set_mode(READ_ONLY)
        except OSError as e2:
            log.error("thin-pool: aborting the transaction failed: %s", e2)
            self.set_mode(FAIL)

    def check_writable(self) -> None:
        """New blocks need a metadata change, which these modes refuse."""
        if self.mode in _NO_METADATA_CHANGES:
            raise _pool_error(f"thin-pool is {'failed' if self.mode == FAIL else 'read-only'}")

    def _check_metadata_space(self, md: PoolMetadata) -> None:
        """After a commit, as 6.1's: one event when the free metadata blocks fall to the
        threshold; out-of-metadata-space mode (read-only until a reload grows the device)
        when only the reserve is left."""
        free = md.meta.nr_free
        if free <= metadata_threshold(md.meta.nr_blocks):
            if not self.metadata_low:
                log.warning("thin-pool: reached low water mark for metadata device: "
                            "sending event.")
                self.metadata_low = True
                self.raise_event()
        else:
            self.metadata_low = False
        if free <= metadata_reserve(md.meta.nr_blocks) and self.mode in (RW,
                                                                          OUT_OF_DATA_SPACE):
            log.error("thin-pool: No free metadata blocks")
            self.set_mode(OUT_OF_METADATA_SPACE)

    # Commit

    async def commit(self) -> None:
        if self.md is None or self.mode in _NO_METADATA_CHANGES:
            return
        async with self.gate:
            self.committers += 1
            try:
                await self.gate.wait_for(lambda: not self.provisions)
            except BaseException:
                self.committers -= 1
                self.gate.notify_all()
                raise
        try:
            async with self.lock:
                md = self.metadata()
                if md.changed:
                    await flush_device(self.data)
                    try:
                        await md.commit()
                    except OSError as e:
                        await self.metadata_failed(e)
                        raise _pool_error(f"thin-pool: commit failed: {e}") from None
                    self._check_metadata_space(md)
        finally:
            async with self.gate:
                self.committers -= 1
                self.gate.notify_all()

    async def flush_thin(self, dev_id: int) -> None:
        """A FLUSH (or FUA) to thin `dev_id`, as 6.1 handles one: it commits only when
        that thin changed in this transaction (bio_triggers_commit), else it goes down to
        the data device; it fails when the pool has failed, when an aborted transaction
        lost that thin's changes, or when the commit it needs is refused (read-only and
        out-of-metadata-space pools: 6.1's commit() gives -EINVAL and errors the flush)."""
        md = self.md
        if self.mode == FAIL or md is None:
            raise _pool_error("thin-pool has failed")
        if dev_id in self.aborted_with_changes:
            raise _pool_error(f"thin {dev_id}: changes were lost when the pool's metadata "
                              "transaction was aborted")
        d = md.devices.get(dev_id)
        if d is None or not d.changed:
            # Unchanged, or its changes are in a commit under way (which holds the lock):
            # that commit ends first, as 6.1's one worker ends a commit before it looks at
            # the next flush, so a flush that returns in rw mode has its writes committed.
            async with self.lock:
                pass
            await flush_device(self.data)
            return
        if self.mode in _NO_METADATA_CHANGES:
            state = "read-only" if self.mode == READ_ONLY else "out of metadata space"
            raise _pool_error(f"thin-pool is {state}: cannot commit")
        await self.commit()

    # Lookups and provisioning (for thin.py)

    def lookup_cached(self, dev_id: int, vblock: int) -> tuple[int, bool] | None | Missing:
        """`lookup` without the lock or an await, when that is safe, else MISSING: the lock
        is free (no metadata change is half done), the block is not being provisioned, and
        the walk finds every node in memory. A provisioned block's read or write then costs
        one synchronous walk instead of a lock and two coroutine calls."""
        md = self.md
        if md is None or self.lock.locked() or self.mode == FAIL or (dev_id, vblock) in self.cells:
            return MISSING
        return md.find_block_cached(dev_id, vblock)

    async def lookup(self, dev_id: int, vblock: int) -> tuple[int, bool] | None:
        while (dev_id, vblock) in self.cells:
            await self.cells[dev_id, vblock].wait()
        if self.mode == FAIL:
            raise _pool_error("thin-pool has failed")
        async with self.lock:
            return await self.metadata().find_block(dev_id, vblock)

    async def provision(self, dev_id: int, vblock: int,
                        fill: Callable[[int], Awaitable[None]]) -> bool:
        """Give (dev_id, vblock) a new data block, filled by `await fill(block)`, then map it.
        False if another request got there first (the caller looks again)."""
        key = (dev_id, vblock)
        if key in self.cells:
            return False
        cell = self.cells[key] = asyncio.Event()
        try:
            while True:
                block = await self._enter_and_alloc()
                if block is not None:
                    break
                await self._wait_for_space()
            owner = self.md  # a failed transaction replaces it: then the block is not ours
            try:
                await fill(block)
                async with self.lock:
                    md = self.metadata()
                    try:
                        await md.insert_block(dev_id, vblock, block)
                    except OSError as e:
                        await self.metadata_failed(e)
                        raise _pool_error(f"thin-pool: mapping failed: {e}") from None
                    high = self.highest.get(dev_id)
                    if high is None or vblock > high:
                        self.highest[dev_id] = vblock
            except BaseException:
                async with self.lock:
                    if owner is not None and owner is self.md and owner.data.get(block):
                        owner.free_data_block(block)
                raise
            finally:
                await self._count_out()
        finally:
            del self.cells[key]
            cell.set()
        return True

    async def _enter_and_alloc(self) -> int | None:
        """Count a provisioning in (not while a commit waits) and allocate; None (and
        counted out again) when the data device is full and the caller should wait."""
        if self.committers:  # a commit waits for provisionings to end: none start meanwhile
            async with self.gate:
                await self.gate.wait_for(lambda: not self.committers)
                self.provisions += 1
        else:  # nothing to wait for (the common case), so no trip through the gate
            self.provisions += 1
        try:
            self.check_writable()
            async with self.lock:
                md = self.metadata()
                free = md.data.nr_free
                if free <= self.low_water and not self.low_water_triggered:
                    log.warning("thin-pool: reached low water mark for data device: "
                                "sending event.")
                    self.low_water_triggered = True
                    self.raise_event()
                try:
                    return md.alloc_data_block()
                except NoSpace:
                    pass
        except BaseException:
            await self._count_out()
            raise
        await self._count_out()
        # Blocks freed in this transaction become usable once it commits.
        await self.commit()
        async with self.lock:
            md = self.metadata()
            if md.data.nr_free:
                return None  # the commit freed some: try again
            self.set_mode(OUT_OF_DATA_SPACE)
        if self.error_if_no_space:
            raise OSError(errno.ENOSPC, "thin-pool is out of data space")
        return None

    async def _count_out(self) -> None:
        """A provisioning has ended; a commit waiting for none to be left hears of it."""
        self.provisions -= 1
        if self.committers:
            async with self.gate:
                self.gate.notify_all()

    async def _wait_for_space(self) -> None:
        """Queue until a resume (that may have grown the data device) or the timeout."""
        if self.mode != OUT_OF_DATA_SPACE:
            return
        if self.error_if_no_space:
            raise OSError(errno.ENOSPC, "thin-pool is out of data space")
        try:
            await asyncio.wait_for(self.space.wait(), no_space_timeout)
        except TimeoutError:
            log.warning("thin-pool: switching to error_if_no_space after %s s",
                        no_space_timeout)
            self.error_if_no_space = True
            self.raise_event()
            raise OSError(errno.ENOSPC, "thin-pool is out of data space") from None

    async def discard(self, dev_id: int, vblock: int) -> None:
        """Unmap a whole block; pass the discard down to the data device when no other
        thin still maps its data block (6.1's passdown checks sharing the same way)."""
        key = (dev_id, vblock)
        while key in self.cells:
            await self.cells[key].wait()
        self.check_writable()
        async with self.lock:
            md = self.metadata()
            found = await md.find_block(dev_id, vblock)
            if found is None:
                return
            try:
                await md.remove_block(dev_id, vblock)
            except OSError as e:
                await self.metadata_failed(e)
                raise _pool_error(f"thin-pool: unmapping failed: {e}") from None
            if vblock == self.highest.get(dev_id):
                self.highest[dev_id] = await md.highest_mapped(dev_id)
            # Under the lock: the freed block is not handed out again before a commit,
            # which needs the lock, so nothing can be written there before this trim.
            if not md.data.get(found[0]) and self.discard_passdown and self.data.caps.trim:
                await self.data.trim(found[0] * self.block_bytes, self.block_bytes)

    # Thin devices

    def open_thin(self, dev_id: int) -> None:
        if self.md is not None and dev_id not in self.md.devices:
            raise TargetError("Couldn't open thin internal device", errno.ENODATA)
        self.open_thins[dev_id] = self.open_thins.get(dev_id, 0) + 1

    def close_thin(self, dev_id: int) -> None:
        self.open_thins[dev_id] -= 1
        if not self.open_thins[dev_id]:
            del self.open_thins[dev_id]

    # Messages

    async def message(self, args: list[str]) -> None:
        if self.mode in _NO_METADATA_CHANGES:
            raise OSError(errno.EOPNOTSUPP, "unable to service pool target messages in "
                                            "READ_ONLY or FAIL mode")
        verb = args[0].lower()
        counts = {"create_thin": 2, "create_snap": 3, "delete": 2, "set_transaction_id": 3,
                  "reserve_metadata_snap": 1, "release_metadata_snap": 1}
        if verb not in counts:
            raise OSError(errno.EINVAL, f"Unrecognised thin pool target message received: "
                                        f"{args[0]}")
        if len(args) != counts[verb]:
            raise OSError(errno.EINVAL, f"Incorrect number of arguments: expected "
                                        f"{counts[verb]}")
        async with self.lock:
            md = self.metadata()
            try:
                await self._message(md, verb, args)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    await self.metadata_failed(e)
                raise
        await self.commit()

    async def _message(self, md: PoolMetadata, verb: str, args: list[str]) -> None:
        if verb == "create_thin":
            dev_id = _dev_id(args[1])
            await md.create_thin(dev_id)
            self.highest[dev_id] = None
        elif verb == "create_snap":
            dev_id, origin = _dev_id(args[1]), _dev_id(args[2])
            await md.create_snap(dev_id, origin)
            self.highest[dev_id] = self.highest.get(origin)
        elif verb == "delete":
            dev_id = _dev_id(args[1])
            if self.open_thins.get(dev_id):
                raise OSError(errno.EBUSY, f"device {dev_id} is open")
            await md.delete(dev_id)
            self.highest.pop(dev_id, None)
        elif verb == "set_transaction_id":
            old = _uint(args[1], "Unrecognised id")
            new = _uint(args[2], "Unrecognised new id")
            md.set_transaction_id(old, new)
        elif verb == "reserve_metadata_snap":
            await md.reserve_metadata_snap()
        else:
            await md.release_metadata_snap()


def metadata_reserve(nr_blocks: int) -> int:
    """__set_metadata_reserve: blocks kept back for the metadata's own bookkeeping."""
    return min(4096, nr_blocks // 10)


def metadata_threshold(nr_blocks: int) -> int:
    """calc_metadata_threshold: 4 MiB, or a quarter of a smaller device."""
    return min(1024, nr_blocks // 4)


def _uint(word: str, error: str) -> int:
    if not word.isdigit() or int(word) >= 2**64:
        raise OSError(errno.EINVAL, f"{error} {word}")
    return int(word)


def _dev_id(word: str) -> int:
    if not word.isdigit() or int(word) > MAX_DEV_ID:
        raise OSError(errno.EINVAL, f"Message received with invalid device id: {word}")
    return int(word)


# Pools by metadata device, as the kernel's pool table finds them on a reload.
_POOLS: dict[int, Pool] = {}


class ThinPool(Target):
    name = "thin-pool"
    version = (1, 22, 0)
    singleton = True
    immutable = True

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) < 4:
            raise TargetError("Invalid argument count")
        self.features = self._features(args[4:])
        self.meta_ref = ctx.device(args[0], 0, 0)
        self.data_ref = ctx.device(args[1], 0)
        if self.meta_ref.device.caps.read_only:
            raise TargetError("Error opening metadata block device", errno.EACCES)
        sectors = parse_uint(args[2], "Invalid block size", 2**32 - 1)
        if (sectors < MIN_BLOCK_SECTORS or sectors > MAX_BLOCK_SECTORS
                or sectors % MIN_BLOCK_SECTORS):
            raise TargetError("Invalid block size")
        self.block_sectors = sectors
        self.low_water = parse_uint(args[3], "Invalid low water mark")
        if self.meta_ref.device.size < 2 * BLOCK_SIZE:
            raise TargetError("metadata device too small")
        self.read_only = "read_only" in self.features
        self.zero_new_blocks = "skip_block_zeroing" not in self.features
        self.error_if_no_space = "error_if_no_space" in self.features
        self.discard_enabled = "ignore_discard" not in self.features
        self.discard_passdown = self.discard_enabled and (
            "no_discard_passdown" not in self.features and self.data_ref.device.caps.trim)
        self.raise_event = ctx.raise_event
        data = self.data_ref.device
        key = id(self.meta_ref.device)
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = Pool(self.meta_ref.device, data, sectors)
        elif pool.block_sectors != sectors:
            raise TargetError("Pool's data block size changed")
        elif pool.data is not data:
            raise TargetError("metadata device already in use by a pool")
        pool.users += 1
        if pool.md is None:  # not bound yet: thins loaded before the first resume see these
            pool.discard_enabled = self.discard_enabled
        self.pool = pool
        self.caps = combine_caps([data.caps])
        self.block_size = BlockSize(max(SECTOR, data.block_size.minimum),
                                    max(4096, data.block_size.minimum), data.block_size.maximum)

    @staticmethod
    def _features(args: list[str]) -> list[str]:
        if not args:
            return []
        count = parse_uint(args[0], "Invalid number of pool feature arguments", 5)
        if count != len(args) - 1:
            raise TargetError("Invalid number of pool feature arguments")
        out = []
        for word in args[1:]:
            if word.lower() not in _FEATURES:
                raise TargetError("Unrecognised pool feature requested")
            out.append(word.lower())
        return out

    def status_table(self) -> ThinPoolTable:
        # emit_flags: the count and the features in the kernel's order.
        feats = tuple(f for f in _FEATURES if f in self.features)
        return ThinPoolTable(self.meta_ref.key, self.data_ref.key, self.block_sectors,
                             self.low_water, feats)

    def status_info(self) -> ThinPoolStatus:
        pool = self.pool
        if pool.mode == FAIL:
            return ThinPoolStatus("Fail")
        md = pool.md
        if md is None:
            return ThinPoolStatus("Error")
        mode = READ_ONLY if pool.mode == OUT_OF_METADATA_SPACE else pool.mode
        discard = ("ignore_discard" if not pool.discard_enabled else
                   "discard_passdown" if pool.discard_passdown else "no_discard_passdown")
        space = "error_if_no_space" if pool.error_if_no_space else "queue_if_no_space"
        meta_total = md.meta.nr_blocks
        # 6.1 keeps min(4096, a tenth) of the metadata blocks in reserve and counts them
        # as used (dm_pool_get_free_metadata_block_count's metadata_reserve).
        meta_used = min(meta_total, md.meta.nr_allocated + metadata_reserve(meta_total))
        return ThinPoolStatus(
            None, md.sb.trans_id, meta_used, meta_total, md.data.nr_allocated,
            md.data.nr_blocks, md.sb.held_root or None, mode, discard, space, md.needs_check,
            metadata_threshold(metadata_blocks(pool.metadata_dev)))

    def devices(self) -> list[DeviceRef]:
        return [self.meta_ref, self.data_ref]

    async def message(self, args: list[str]) -> str | None:
        await self.pool.message(args)
        return None

    async def resume(self) -> None:
        await self.pool.bind(self)

    async def flush(self) -> None:
        await flush_device(self.pool.data)
        await self.pool.commit()

    async def destroy(self) -> None:
        pool = self.pool
        pool.users -= 1
        if not pool.users:
            _POOLS.pop(id(pool.metadata_dev), None)
            await pool.close()

    # The pool device's own I/O goes to the data device.

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.pool.data.pread(buf, offset)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        await self.pool.data.pwrite(buf, offset, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.pool.data.trim(offset, length, fua)
