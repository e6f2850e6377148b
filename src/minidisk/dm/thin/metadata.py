"""A thin pool's metadata: devices, mappings, space maps, transactions (dm-thin-metadata.c).

The superblock (block 0) points at the mapping tree (thin id -> root of that thin's tree
of virtual block -> (data block, time)), the device-details tree (thin id -> mapped blocks,
transaction id, creation and snapshot times) and the two space maps' roots. A transaction
collects shadowed nodes (`btree.Store`) and count changes (`SpaceMap`); `commit` writes
the space maps out, then every changed block, flushes, and only then writes the
superblock with FUA: until that last write the previous transaction is what is on disk.

The space maps are written from the in-memory counts: changed bitmaps move to new blocks,
the data map's index btree and both overflow btrees (counts above 2) are rebuilt, and the
metadata map's index block moves too. Those moves change metadata counts themselves, so
the metadata map's bitmaps are moved until no moved bitmap leaves another one dirty.

Snapshots follow the kernel: `create_snap` takes a reference on the origin's tree and
bumps the pool's time; a mapping is shared when its time is older than the thin's last
snapshot, and writing it then goes to a new data block.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace

from minidisk.device.api import BlockDevice
from minidisk.dm.thin import btree
from minidisk.dm.thin.btree import Store, ValueType
from minidisk.dm.thin.disk import (
    BLOCK_SIZE,
    ENTRIES_PER_BITMAP,
    MAX_METADATA_BLOCKS,
    NEEDS_CHECK,
    MetadataError,
    SpaceMapRoot,
    Superblock,
    pack_bitmap,
    pack_details,
    pack_index,
    pack_index_value,
    pack_mapping,
    unpack_bitmap,
    unpack_details,
    unpack_index,
    unpack_index_value,
    unpack_mapping,
)
from minidisk.dm.thin.spacemap import SpaceMap

MAX_DEV_ID = (1 << 24) - 1


@dataclass(slots=True)
class ThinDevice:
    """A thin's details, as the kernel's `struct dm_thin_device` keeps them in memory."""

    id: int
    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int
    changed: bool = False
    open_count: int = 0


class DataRefs(ValueType):
    """Mapping-tree leaves refer to data blocks."""

    def __init__(self, data: SpaceMap) -> None:
        super().__init__(8)
        self.data = data

    def inc(self, value: int) -> None:
        self.data.inc(value >> 24)

    async def dec(self, value: int) -> None:
        self.data.dec(value >> 24)


class SubtreeRefs(ValueType):
    """Top-level leaves refer to a thin's mapping tree; losing the last reference frees it."""

    def __init__(self, store: Store, data: DataRefs) -> None:
        super().__init__(8)
        self.store = store
        self.data = data

    def inc(self, value: int) -> None:
        self.store.sm.inc(value)

    async def dec(self, value: int) -> None:
        await btree.delete_tree(self.store, value, self.data)


class SubtreeMoves(SubtreeRefs):
    """Storing a thin's new root where its old one was: shadowing already let go of the
    old root, so the replaced value loses nothing."""

    async def dec(self, value: int) -> None:
        pass


def metadata_blocks(device: BlockDevice) -> int:
    return min(device.size // BLOCK_SIZE, MAX_METADATA_BLOCKS)


class PoolMetadata:
    def __init__(self, device: BlockDevice, data_block_size: int) -> None:
        self.device = device
        self.data_block_size = data_block_size  # sectors
        self.meta = SpaceMap("metadata")
        self.data = SpaceMap("data")
        self.store = Store(device, self.meta)
        self.data_refs = DataRefs(self.data)
        self.subtrees = SubtreeRefs(self.store, self.data_refs)
        self.moves = SubtreeMoves(self.store, self.data_refs)
        self.plain = {size: ValueType(size) for size in (4, 8, 16, 24)}
        self.sb = Superblock()
        self.committed = self.sb  # what block 0 holds
        self.devices: dict[int, ThinDevice] = {}
        # Each thin's mapping-tree root, as the top-level tree has it: a cache that spares
        # every lookup the walk of that tree. Mapping changes keep it; other changes of the
        # top-level tree drop the entry.
        self._roots: dict[int, int] = {}
        self.changed = False
        # Bumped as each change of mappings, sharing or devices begins (before its first
        # await): what a thin remembers of its mappings (thin.py's route) is good only
        # while this holds still.
        self.generation = 0

    # Opening

    async def open(self, may_format: bool = True) -> None:
        """Load the metadata, or format it if block 0 is all zeroes (as the kernel does)."""
        if self.device.size < 2 * BLOCK_SIZE:
            raise OSError(errno.EINVAL, "metadata device too small")
        raw = await self.store.read_block(0)
        if not any(raw):
            if not may_format:
                raise OSError(errno.EPERM, "metadata is not formatted and the pool is "
                                           "read-only")
            await self._format()
        else:
            await self._load(raw)
        nr = metadata_blocks(self.device)
        if nr > self.meta.nr_blocks:
            self.meta.extend(nr)
            self.changed = True

    async def _format(self) -> None:
        self.meta = SpaceMap("metadata", metadata_blocks(self.device))
        self.store.sm = self.meta
        self.meta.set(0, 1)  # the superblock
        self.sb = Superblock(data_block_size=self.data_block_size)
        self.sb.data_mapping_root = btree.empty(self.store, 8)
        self.sb.device_details_root = btree.empty(self.store, 24)
        self.changed = True
        await self.commit()

    async def _load(self, raw: bytes) -> None:
        sb = Superblock.unpack(raw)
        if sb.data_block_size != self.data_block_size:
            raise MetadataError(f"changed data block size: metadata has {sb.data_block_size} "
                                f"sectors, the table {self.data_block_size}")
        if sb.incompat_flags:
            raise MetadataError(f"unknown incompatible features {sb.incompat_flags:#x}")
        self.sb, self.committed = sb, replace(sb)
        meta_root = SpaceMapRoot.unpack(sb.metadata_sm)
        self.meta = SpaceMap("metadata", meta_root.nr_blocks)
        self.store.sm = self.meta
        nr_bitmaps = len(self.meta.bitmaps)
        index = unpack_index(await self.store.read_block(meta_root.bitmap_root),
                             meta_root.bitmap_root, nr_bitmaps)
        self.meta.index_root = meta_root.bitmap_root
        await self._load_map(self.meta, [e[0] for e in index], meta_root.ref_count_root)
        data_root = SpaceMapRoot.unpack(sb.data_sm)
        self.data = SpaceMap("data", data_root.nr_blocks)
        self.data_refs.data = self.data
        entries = await btree.items(self.store, data_root.bitmap_root)
        if [k for k, _ in entries] != list(range(len(self.data.bitmaps))):
            raise MetadataError("data space map index does not cover the data device")
        self.data.index_root = data_root.bitmap_root
        await self._load_map(self.data, [unpack_index_value(v)[0] for _, v in entries],
                             data_root.ref_count_root)
        for dev_id, value in await btree.items(self.store, sb.device_details_root):
            self.devices[dev_id] = ThinDevice(dev_id, *unpack_details(value))

    async def _load_map(self, sm: SpaceMap, bitmaps: list[int], ref_count_root: int) -> None:
        for i, b in enumerate(bitmaps):
            sm.load_counts(i * ENTRIES_PER_BITMAP, unpack_bitmap(await self.store.read_block(b), b))
        sm.bitmaps = bitmaps
        for b, count in await btree.items(self.store, ref_count_root):
            if sm.counts[b] != 3:
                raise MetadataError(f"{sm.what} ref count {count} of block {b} "
                                    f"without a bitmap entry of 3")
            sm.counts[b] = count
        sm.ref_count_root = ref_count_root
        sm.end_transaction()

    # Commit

    async def commit(self) -> None:
        if not self.changed:
            return
        meta, data, store = self.meta, self.data, self.store
        await self._store_details()
        for i in sorted(data.dirty):
            self._move_bitmap(data, i)
        if data.dirty or not data.index_root:
            if data.index_root:
                await btree.free_tree(store, data.index_root)
            data.index_root = btree.build(
                store, [(i, pack_index_value(data.index_entry(i)))
                        for i in range(len(data.bitmaps))], 16)
        if data.overflow_dirty or not data.ref_count_root:
            await self._rebuild_overflow(data)
        if meta.overflow_dirty or not meta.ref_count_root:
            await self._rebuild_overflow(meta)
        moved: set[int] = set()
        index_moved = False
        while True:
            todo = meta.dirty - moved
            if todo:
                for i in sorted(todo):
                    self._move_bitmap(meta, i)
                moved |= todo
            elif not index_moved:
                old, meta.index_root = meta.index_root, meta.alloc()
                if old:
                    meta.dec(old)
                index_moved = True
            else:
                break
        for sm in (data, meta):
            for i in sm.dirty | (moved if sm is meta else set()):
                store.write_raw(sm.bitmaps[i], pack_bitmap(sm.bitmaps[i], sm.bitmap_counts(i)))
        store.write_raw(meta.index_root, pack_index(
            meta.index_root, [meta.index_entry(i) for i in range(len(meta.bitmaps))]))
        self.sb.data_sm = SpaceMapRoot(data.nr_blocks, data.nr_allocated, data.index_root,
                                       data.ref_count_root).pack()
        self.sb.metadata_sm = SpaceMapRoot(meta.nr_blocks, meta.nr_allocated,
                                           meta.index_root, meta.ref_count_root).pack()
        self.sb.metadata_nr_blocks = meta.nr_blocks
        for b, block in store.encoded():
            await self.device.pwrite(memoryview(block), b * BLOCK_SIZE)
        await self._flush()
        await self.device.pwrite(memoryview(self.sb.pack()), 0, fua=self.device.caps.fua)
        if not self.device.caps.fua:
            await self._flush()
        self.committed = replace(self.sb)
        store.committed()
        meta.end_transaction()
        data.end_transaction()
        self.changed = False

    async def _flush(self) -> None:
        if self.device.caps.flush:
            await self.device.flush()

    def _move_bitmap(self, sm: SpaceMap, i: int) -> None:
        old, sm.bitmaps[i] = sm.bitmaps[i], self.meta.alloc()
        if old:
            self.meta.dec(old)

    async def _rebuild_overflow(self, sm: SpaceMap) -> None:
        if sm.ref_count_root:
            await btree.free_tree(self.store, sm.ref_count_root)
        sm.ref_count_root = btree.build(self.store, sm.overflow(), 4)

    # Called by the pool under its lock. Every change marks the transaction changed.

    def _touch(self) -> None:
        self.changed = True

    async def _store_details(self) -> None:
        for d in self.devices.values():
            if d.changed:
                value = pack_details(d.mapped_blocks, d.transaction_id, d.creation_time,
                                     d.snapshotted_time)
                self.sb.device_details_root, _ = await btree.insert(
                    self.store, self.sb.device_details_root, d.id, value, self.plain[24])
                d.changed = False

    # Devices

    def _new_device(self, dev_id: int, time: int) -> ThinDevice:
        d = ThinDevice(dev_id, 0, self.sb.trans_id, time, time, changed=True)
        self.devices[dev_id] = d
        return d

    async def create_thin(self, dev_id: int) -> None:
        self.generation += 1
        if dev_id in self.devices:
            raise OSError(errno.EEXIST, f"device {dev_id} already exists")
        root = btree.empty(self.store, 8)
        self.sb.data_mapping_root, _ = await btree.insert(
            self.store, self.sb.data_mapping_root, dev_id, root, self.subtrees)
        self._new_device(dev_id, self.sb.time)
        self._roots.pop(dev_id, None)
        self._touch()

    async def create_snap(self, dev_id: int, origin_id: int) -> None:
        self.generation += 1
        if dev_id in self.devices:
            raise OSError(errno.EEXIST, f"device {dev_id} already exists")
        origin = self.devices.get(origin_id)
        root = await btree.lookup(self.store, self.sb.data_mapping_root, origin_id)
        if origin is None or root is None:
            raise OSError(errno.ENODATA, f"origin {origin_id} does not exist")
        self.meta.inc(root)
        self.sb.data_mapping_root, _ = await btree.insert(
            self.store, self.sb.data_mapping_root, dev_id, root, self.subtrees)
        self.sb.time += 1
        snap = self._new_device(dev_id, self.sb.time)
        self._roots.pop(dev_id, None)
        snap.mapped_blocks = origin.mapped_blocks
        origin.snapshotted_time = snap.snapshotted_time = self.sb.time
        origin.changed = True
        self._touch()

    async def delete(self, dev_id: int) -> None:
        self.generation += 1
        d = self.devices.get(dev_id)
        if d is None:
            raise OSError(errno.ENODATA, f"device {dev_id} does not exist")
        if d.open_count:
            raise OSError(errno.EBUSY, f"device {dev_id} is open")
        del self.devices[dev_id]
        self._roots.pop(dev_id, None)
        self.sb.device_details_root, _ = await btree.remove(
            self.store, self.sb.device_details_root, dev_id, self.plain[24])
        self.sb.data_mapping_root, _ = await btree.remove(
            self.store, self.sb.data_mapping_root, dev_id, self.subtrees)
        self._touch()

    def set_transaction_id(self, current: int, new: int) -> None:
        if self.sb.trans_id != current:
            raise OSError(errno.EINVAL, f"mismatched transaction id: pool has "
                                        f"{self.sb.trans_id}, not {current}")
        self.sb.trans_id = new
        self._touch()

    async def reserve_metadata_snap(self) -> None:
        await self.commit()
        if self.sb.held_root:
            raise OSError(errno.EBUSY, "Pool metadata snapshot already exists: release this "
                                       "before taking another.")
        held = self.meta.alloc()
        copy = replace(self.sb, blocknr=held, data_sm=bytes(128), metadata_sm=bytes(128))
        self.meta.inc(copy.data_mapping_root)
        self.meta.inc(copy.device_details_root)
        self.store.write_raw(held, copy.pack())
        self.sb.held_root = held
        self._touch()

    async def release_metadata_snap(self) -> None:
        held = self.sb.held_root
        if not held:
            raise OSError(errno.EINVAL, "No pool metadata snapshot found: nothing to release.")
        copy = Superblock.unpack(await self.store.read_block(held), held)
        await btree.delete_tree(self.store, copy.data_mapping_root, self.subtrees)
        await btree.delete_tree(self.store, copy.device_details_root, self.plain[24])
        self.meta.dec(held)
        self.sb.held_root = 0
        self._touch()

    # Mappings

    async def device_root(self, dev_id: int) -> int:
        root = self._roots.get(dev_id)
        if root is not None:
            return root
        root = await btree.lookup(self.store, self.sb.data_mapping_root, dev_id)
        if root is None:
            raise OSError(errno.ENODATA, f"device {dev_id} has no mapping tree")
        self._roots[dev_id] = root
        return root

    async def _store_root(self, dev_id: int, old: int, root: int) -> None:
        if root != old:  # a node shadowed in this transaction changes in place
            self.sb.data_mapping_root, _ = await btree.insert(
                self.store, self.sb.data_mapping_root, dev_id, root, self.moves)
            self._roots[dev_id] = root

    async def find_block(self, dev_id: int, vblock: int) -> tuple[int, bool] | None:
        """(data block, shared) for a mapped virtual block; shared means a snapshot may
        still refer to it, so a write must go to a new block."""
        value = await btree.lookup(self.store, await self.device_root(dev_id), vblock)
        if value is None:
            return None
        block, time = unpack_mapping(value)
        return block, self.devices[dev_id].snapshotted_time > time

    def find_block_cached(self, dev_id: int,
                          vblock: int) -> tuple[int, bool] | None | btree.Missing:
        """`find_block` from memory alone (btree.lookup_cached), or MISSING."""
        root = self._roots.get(dev_id)
        if root is None:
            return btree.MISSING
        value = btree.lookup_cached(self.store, root, vblock)
        if not isinstance(value, int):
            return value  # unmapped, or MISSING
        block, time = value >> 24, value & 0xFFFFFF  # unpack_mapping, inlined: hot path
        return block, self.devices[dev_id].snapshotted_time > time

    async def insert_block(self, dev_id: int, vblock: int, data_block: int) -> None:
        """Map `vblock` to `data_block`, whose one reference the mapping takes over."""
        self.generation += 1
        d = self.devices[dev_id]
        old = await self.device_root(dev_id)
        root, new = await btree.insert(self.store, old, vblock,
                                       pack_mapping(data_block, self.sb.time), self.data_refs)
        await self._store_root(dev_id, old, root)
        if new:
            d.mapped_blocks += 1
        d.changed = True  # as 6.1's __insert: a remap changes the thin too
        self._touch()

    async def remove_block(self, dev_id: int, vblock: int) -> bool:
        self.generation += 1
        d = self.devices[dev_id]
        old = await self.device_root(dev_id)
        root, found = await btree.remove(self.store, old, vblock, self.data_refs)
        if found:
            await self._store_root(dev_id, old, root)
            d.mapped_blocks -= 1
            d.changed = True
            self._touch()
        return found

    async def highest_mapped(self, dev_id: int) -> int | None:
        return await btree.last_key(self.store, await self.device_root(dev_id))

    def alloc_data_block(self) -> int:
        b = self.data.alloc()
        self._touch()
        return b

    def free_data_block(self, b: int) -> None:
        self.data.dec(b)
        self._touch()

    def resize_data(self, nr_blocks: int) -> None:
        if nr_blocks != self.data.nr_blocks:
            self.data.extend(nr_blocks)
            self._touch()

    # Flags

    @property
    def needs_check(self) -> bool:
        return bool(self.sb.flags & NEEDS_CHECK)

    async def set_needs_check(self) -> None:
        """Mark the committed superblock for repair (the open transaction is lost)."""
        self.sb.flags |= NEEDS_CHECK
        self.committed.flags |= NEEDS_CHECK
        await self.device.pwrite(memoryview(self.committed.pack()), 0,
                                 fua=self.device.caps.fua)
