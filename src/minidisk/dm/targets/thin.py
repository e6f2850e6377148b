"""`thin <pool dev> <dev id> [<external origin dev>]`: one thin device of a pool (MD/dm-thin.c).

The pool is found through its mapped device's table, as the kernel's thin_ctr finds it
through the pool's mapped device. The thin's size is its table's length; the pool keeps
none. Reads of unmapped blocks give zeroes, or the external origin's bytes where it has
them; writes are provisioned by the pool (thin_pool.py). FLUSH and FUA commit the pool when
the thin changed (Pool.flush_thin).
Status: `<mapped sectors> <highest mapped sector>` (`-` when nothing is mapped), or Fail.
"""

from __future__ import annotations

import errno

from minidisk.device.api import BlockSize, Caps
from minidisk.dm.mapped import MappedDevice
from minidisk.dm.route import Hop, unwrap
from minidisk.dm.status import ThinStatus
from minidisk.dm.status_table import ThinTable
from minidisk.dm.table import SECTOR
from minidisk.dm.target import DeviceRef, Target, TargetContext, TargetError, parse_uint
from minidisk.dm.targets.thin_pool import FAIL, Pool, ThinPool
from minidisk.dm.thin.btree import Missing
from minidisk.dm.thin.metadata import MAX_DEV_ID, PoolMetadata

FAST_BLOCKS = 1 << 18  # blocks a thin remembers for route(): 16 GiB of 64 KiB blocks


def _find_pool(device: object) -> Pool:
    if isinstance(device, MappedDevice):
        for mapping in (device.live if device.has_live else None, device.inactive):
            if mapping is not None:
                for target in mapping.targets:
                    if isinstance(target, ThinPool):
                        return target.pool
    raise TargetError("Couldn't find pool object", errno.EINVAL)


class Thin(Target):
    name = "thin"
    version = (1, 22, 0)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) not in (2, 3):
            raise TargetError("Invalid argument count")
        self.pool_ref = ctx.device(args[0], 0, 0)
        self.dev_id = parse_uint(args[1], "Invalid device id", MAX_DEV_ID)
        self.origin_ref: DeviceRef | None = None
        if len(args) == 3:
            self.origin_ref = ctx.device(args[2], 0, 0)
            if self.origin_ref.device is self.pool_ref.device:
                raise TargetError("Error opening origin device: it is the pool")
        self.pool = _find_pool(self.pool_ref.device)
        self.pool.open_thin(self.dev_id)
        self.opened = True
        self.bs = self.pool.block_bytes
        data = self.pool.data
        self.caps = Caps(read_only=ctx.read_only, flush=True, fua=True,
                         trim=self.pool.discard_enabled, zero=True, cache=True,
                         rotational=data.caps.rotational)
        self.block_size = BlockSize(SECTOR, 4096)
        self._zeroes = bytes(self.bs)
        self._data_gate, self._data_device = unwrap(data)
        self.routable = data.caps.extents  # route.py: holes are the data device's to tell
        self._fast: dict[int, int] = {}  # virtual block -> its data block's byte offset
        self._fast_md: PoolMetadata | None = None
        self._fast_generation = -1

    def route(self, offset: int, length: int) -> Hop | None:
        """A read or write inside one provisioned block goes straight to the data device
        (route.py), when the lookup needs no lock (`Pool.lookup_cached`), no snapshot
        shares the block (a write must not go there) and the thin has no uncommitted
        change (a FUA write would have to commit it): it then costs what linear's does.
        Blocks found so are remembered (`_fast`) while the metadata's generation holds
        still: any change of mappings, sharing or devices starts by bumping it, and a
        change half done holds the pool's lock, under which nothing is remembered.
        Anything else comes to pread and pwrite below."""
        bs = self.bs
        vblock, within = divmod(offset, bs)
        if within + length > bs:
            return None
        pool = self.pool
        md = pool.md
        if md is None or pool.mode == FAIL:
            return None
        if md is self._fast_md and md.generation == self._fast_generation:
            at = self._fast.get(vblock)
            if at is not None:
                return self._data_gate, self._data_device, at + within, 0
        else:
            self._fast.clear()
            self._fast_md, self._fast_generation = md, md.generation
        found = pool.lookup_cached(self.dev_id, vblock)
        if type(found) is not tuple or found[1] or md.devices[self.dev_id].changed:
            return None
        at = found[0] * bs
        if len(self._fast) < FAST_BLOCKS:
            self._fast[vblock] = at
        return self._data_gate, self._data_device, at + within, 0

    def status_table(self) -> ThinTable:
        return ThinTable(self.pool_ref.key, self.dev_id,
                         self.origin_ref.key if self.origin_ref is not None else None)

    def status_info(self) -> ThinStatus:
        pool = self.pool
        md = pool.md
        if pool.mode == FAIL or md is None:
            return ThinStatus("Fail")
        d = md.devices.get(self.dev_id)
        if d is None:
            return ThinStatus("Fail")
        high = pool.highest.get(self.dev_id)
        sectors = pool.block_sectors
        return ThinStatus(None, d.mapped_blocks * sectors,
                          None if high is None else (high + 1) * sectors - 1)

    def devices(self) -> list[DeviceRef]:
        refs = [self.pool_ref]
        return refs + [self.origin_ref] if self.origin_ref is not None else refs

    async def resume(self) -> None:
        md = self.pool.metadata()
        if self.dev_id not in md.devices:
            raise OSError(errno.ENODATA, f"thin device {self.dev_id} does not exist")

    async def destroy(self) -> None:
        if self.opened:
            self.opened = False
            self.pool.close_thin(self.dev_id)

    async def flush(self) -> None:
        await self.pool.flush_thin(self.dev_id)

    # I/O

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(virtual block, offset in it, position in request, bytes)."""
        out = []
        pos = 0
        bs = self.bs
        while pos < length:
            vblock, within = divmod(offset + pos, bs)
            n = min(bs - within, length - pos)
            out.append((vblock, within, pos, n))
            pos += n
        return out

    async def pread(self, buf: memoryview, offset: int) -> None:
        """Block by block, but one read of the data device for each run of blocks that lie
        next to each other there (sequential writes provision them so), and one fill for
        each run of unmapped ones."""
        pool, bs = self.pool, self.bs
        vblock, within = divmod(offset, bs)
        if within + len(buf) <= bs:  # inside one provisioned block: the common case
            found = pool.lookup_cached(self.dev_id, vblock)
            if type(found) is tuple:
                await pool.data.pread(buf, found[0] * bs + within)
                return
        run_start = run_at = -1  # the open run: its position in buf, its data-device offset
        run_end = 0
        unmapped = False
        for vblock, within, pos, n in self._pieces(offset, len(buf)):
            found = pool.lookup_cached(self.dev_id, vblock)
            if isinstance(found, Missing):
                found = await pool.lookup(self.dev_id, vblock)
            at = -1 if found is None else found[0] * bs + within
            if run_start >= 0 and (unmapped if at < 0 else at == run_at + run_end - run_start):
                run_end = pos + n
                continue
            if run_start >= 0:
                await self._read_run(buf[run_start:run_end], run_at, offset + run_start,
                                     unmapped)
            run_start, run_end, run_at, unmapped = pos, pos + n, at, at < 0
        if run_start >= 0:
            await self._read_run(buf[run_start:run_end], run_at, offset + run_start, unmapped)

    async def _read_run(self, view: memoryview, at: int, virtual: int, unmapped: bool) -> None:
        if unmapped:
            await self._read_unmapped(view, virtual)
        else:
            await self.pool.data.pread(view, at)

    async def _read_unmapped(self, view: memoryview, at: int) -> None:
        """Zeroes, or the external origin's bytes as far as it reaches."""
        inside = 0
        if self.origin_ref is not None:
            inside = max(0, min(len(view), self.origin_ref.device.size - at))
            if inside:
                await self.origin_ref.device.pread(view[:inside], at)
        zeroes = self._zeroes
        for at in range(inside, len(view), len(zeroes)):  # a run may span several blocks
            n = min(len(zeroes), len(view) - at)
            view[at:at + n] = zeroes[:n]

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if self.caps.read_only:
            raise OSError(errno.EROFS, "thin device is read-only")
        pool, bs = self.pool, self.bs
        vblock, within = divmod(offset, bs)
        if within + len(buf) <= bs:  # inside one provisioned, unshared block: the common case
            found = pool.lookup_cached(self.dev_id, vblock)
            if type(found) is tuple and not found[1]:
                await pool.data.pwrite(buf, found[0] * bs + within)
                if fua:
                    await pool.flush_thin(self.dev_id)
                return
        for vblock, within, pos, n in self._pieces(offset, len(buf)):
            await self._write_block(buf[pos:pos + n], vblock, within)
        if fua:
            await pool.flush_thin(self.dev_id)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Unmap the whole blocks inside the range; parts of blocks stay as they are (as
        6.1, which discards block-aligned ranges only)."""
        if self.caps.read_only:
            raise OSError(errno.EROFS, "thin device is read-only")
        if not self.pool.discard_enabled:
            return
        bs = self.bs
        for vblock in range(-(-offset // bs), (offset + length) // bs):
            await self.pool.discard(self.dev_id, vblock)
        if fua:
            await self.pool.flush_thin(self.dev_id)

    async def _write_block(self, view: memoryview, vblock: int, within: int) -> None:
        pool, bs = self.pool, self.bs
        while True:
            found = pool.lookup_cached(self.dev_id, vblock)
            if isinstance(found, Missing):
                found = await pool.lookup(self.dev_id, vblock)
            if found is not None and not found[1]:
                await pool.data.pwrite(view, found[0] * bs + within)
                return
            pool.check_writable()
            old = found[0] if found is not None else None

            async def fill(block: int, old: int | None = old) -> None:
                await self._fill(block, old, vblock, view, within)

            if await pool.provision(self.dev_id, vblock, fill):
                return

    async def _fill(self, block: int, old: int | None, vblock: int, view: memoryview,
                    within: int) -> None:
        """Write a new data block: the request's bytes over the block's old contents (a
        shared block's, the external origin's, or zeroes)."""
        pool, bs = self.pool, self.bs
        at = block * bs
        if len(view) == bs:
            await pool.data.pwrite(view, at)
            return
        if old is None and self.origin_ref is None:
            end = within + len(view)
            if pool.zero_new_blocks and pool.data.caps.zero:
                # The rest of the block by write-zeroes, as 6.1's ll_zero has dm-kcopyd do
                # when the data device supports it: a sparse device (a memory device, a
                # file) then allocates nothing for the zeroes, and no zero buffer is copied.
                if within:
                    await pool.data.zero(at, within)
                if end < bs:
                    await pool.data.zero(at + end, bs - end)
            if not pool.zero_new_blocks or pool.data.caps.zero:
                await pool.data.pwrite(view, at + within)
                return
        whole = bytearray(bs)
        if old is not None:
            await pool.data.pread(memoryview(whole), old * bs)
        elif self.origin_ref is not None:
            await self._read_unmapped(memoryview(whole), vblock * bs)
        whole[within:within + len(view)] = view
        await pool.data.pwrite(memoryview(whole), at)
