"""Copy-on-write btrees over the metadata device, as persistent-data's dm-btree keeps them.

`Store` is the transaction manager: it reads and caches nodes, allocates blocks from the
metadata space map, and shadows: a node about to change is copied to a new block unless it
was already copied in this transaction and nobody else points at it, so the committed
tree is never written over. Copying a node that others share (a snapshot's mapping tree)
takes a reference on everything it points at, so both copies own their children: that is
how a snapshot shares data blocks until one side writes them.

Trees have le64 keys; values are integers of the tree's value size. A `ValueType` says
what a leaf value refers to (a data block, a subtree, nothing) so that sharing and
freeing count it. Inserts split full nodes on the way down, as the kernel does, and
removals merge or even out a node that falls under a third full, so that every non-root
node stays at least a third full (thin_check's rule).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator

from minidisk.device.api import BlockDevice
from minidisk.dm.thin.disk import (
    BLOCK_SIZE,
    INTERNAL_NODE,
    LEAF_NODE,
    max_entries,
    pack_node,
    unpack_node,
)
from minidisk.dm.thin.spacemap import SpaceMap

CLEAN_CACHE = 4096  # clean nodes kept in memory (16 MiB of metadata)


class Node:
    __slots__ = ("flags", "keys", "values", "value_size")

    def __init__(self, flags: int, keys: list[int], values: list[int], value_size: int) -> None:
        self.flags = flags
        self.keys = keys
        self.values = values
        self.value_size = value_size

    @property
    def leaf(self) -> bool:
        return self.flags == LEAF_NODE

    @property
    def capacity(self) -> int:
        return max_entries(self.value_size)

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.capacity


class ValueType:
    """What a leaf value refers to; the default refers to nothing."""

    def __init__(self, size: int) -> None:
        self.size = size

    def inc(self, value: int) -> None:
        """Another node now refers to what `value` refers to."""

    async def dec(self, value: int) -> None:
        """A reference to what `value` refers to went away."""


class Store:
    """Metadata blocks in one transaction: a node cache, dirty nodes, and raw blocks
    (space-map bitmaps, the index) to write at commit."""

    def __init__(self, device: BlockDevice, sm: SpaceMap) -> None:
        self.device = device
        self.sm = sm
        self.dirty: dict[int, Node] = {}
        self.clean: OrderedDict[int, Node] = OrderedDict()
        self.raw: dict[int, bytearray] = {}

    async def read_block(self, b: int) -> bytes:
        buf = bytearray(BLOCK_SIZE)
        await self.device.pread(memoryview(buf), b * BLOCK_SIZE)
        return bytes(buf)

    async def node(self, b: int) -> Node:
        node = self.dirty.get(b)
        if node is not None:
            return node
        node = self.clean.get(b)
        if node is not None:
            self.clean.move_to_end(b)
            return node
        flags, keys, values, value_size = unpack_node(await self.read_block(b), b)
        node = Node(flags, keys, values, value_size)
        self.clean[b] = node
        if len(self.clean) > CLEAN_CACHE:
            self.clean.popitem(last=False)
        return node

    def new_node(self, flags: int, value_size: int, keys: list[int] | None = None,
                 values: list[int] | None = None) -> tuple[int, Node]:
        b = self.sm.alloc()
        node = Node(flags, keys or [], values or [], value_size)
        self.dirty[b] = node
        self.clean.pop(b, None)
        return b, node

    async def shadow(self, b: int, vt: ValueType) -> tuple[int, Node]:
        """The node at `b`, made writable: itself if this transaction made it and nobody
        shares it, else a copy in a new block (the caller stores the new location)."""
        count = self.sm.get(b)
        if b in self.sm.fresh and count == 1 and b in self.dirty:
            return b, self.dirty[b]
        old = await self.node(b)
        nb, node = self.new_node(old.flags, old.value_size, list(old.keys), list(old.values))
        self.sm.dec(b)
        if count > 1:
            if node.leaf:
                for v in node.values:
                    vt.inc(v)
            else:
                for v in node.values:
                    self.sm.inc(v)
        return nb, node

    def forget(self, b: int) -> None:
        self.dirty.pop(b, None)

    def write_raw(self, b: int, block: bytearray) -> None:
        self.raw[b] = block

    def encoded(self) -> Iterator[tuple[int, bytearray]]:
        """Every block this transaction wrote: dirty nodes, then raw blocks."""
        for b, node in self.dirty.items():
            if self.sm.get(b):
                yield b, pack_node(b, node.flags, node.keys, node.values, node.value_size)
        yield from self.raw.items()

    def committed(self) -> None:
        for b, node in self.dirty.items():
            self.clean[b] = node
        self.dirty = {}
        self.raw = {}
        while len(self.clean) > CLEAN_CACHE:
            self.clean.popitem(last=False)


def empty(store: Store, value_size: int) -> int:
    b, _ = store.new_node(LEAF_NODE, value_size)
    return b


class Missing:
    """A walk that would have to read a node from the device."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()


def lookup_cached(store: Store, root: int, key: int) -> int | None | Missing:
    """`lookup` from the nodes in memory alone, with no await: MISSING when the walk needs
    a node that is not there. Without an await nothing can change the tree during the walk,
    so a caller that knows no change is half done (the pool's lock is free) needs no lock."""
    node = store.dirty.get(root) or store.clean.get(root)
    while node is not None:
        keys = node.keys
        i = bisect.bisect_right(keys, key) - 1
        if node.flags == LEAF_NODE:
            return node.values[i] if i >= 0 and keys[i] == key else None
        if i < 0:
            return None
        b = node.values[i]
        node = store.dirty.get(b) or store.clean.get(b)
    return MISSING


async def lookup(store: Store, root: int, key: int) -> int | None:
    node = await store.node(root)
    while True:
        i = bisect.bisect_right(node.keys, key) - 1
        if node.leaf:
            return node.values[i] if i >= 0 and node.keys[i] == key else None
        if i < 0:
            return None
        node = await store.node(node.values[i])


async def last_key(store: Store, root: int) -> int | None:
    node = await store.node(root)
    while not node.leaf:
        node = await store.node(node.values[-1])
    return node.keys[-1] if node.keys else None


async def items(store: Store, root: int) -> list[tuple[int, int]]:
    """Every (key, value) in key order."""
    out: list[tuple[int, int]] = []

    async def walk(b: int) -> None:
        node = await store.node(b)
        if node.leaf:
            out.extend(zip(node.keys, node.values, strict=True))
        else:
            for child in node.values:
                await walk(child)
    await walk(root)
    return out


def _split(store: Store, node: Node) -> tuple[int, Node]:
    """Move the upper half of `node` into a new sibling; return the sibling."""
    half = len(node.keys) // 2
    b, sibling = store.new_node(node.flags, node.value_size, node.keys[half:],
                                node.values[half:])
    del node.keys[half:]
    del node.values[half:]
    return b, sibling


async def insert(store: Store, root: int, key: int, value: int, vt: ValueType) -> tuple[int, bool]:
    """Insert or replace; return the new root and whether the key is new. The tree takes
    over one reference of `value`; a replaced value loses one."""
    root, node = await store.shadow(root, vt)
    if node.full:
        # Split beneath: the root's entries go to two new children.
        lb, left = store.new_node(node.flags, node.value_size, node.keys, node.values)
        rb, right = _split(store, left)
        node.flags, node.value_size = INTERNAL_NODE, 8
        node.keys, node.values = [left.keys[0], right.keys[0]], [lb, rb]
    while not node.leaf:
        i = bisect.bisect_right(node.keys, key) - 1
        if i < 0:
            node.keys[0] = key  # the new lowest key of the subtree
            i = 0
        cb, child = await store.shadow(node.values[i], vt)
        node.values[i] = cb
        if child.full:
            sb, sibling = _split(store, child)
            node.keys.insert(i + 1, sibling.keys[0])
            node.values.insert(i + 1, sb)
            if key >= sibling.keys[0]:
                child = sibling
        node = child
    i = bisect.bisect_left(node.keys, key)
    if i < len(node.keys) and node.keys[i] == key:
        old = node.values[i]
        node.values[i] = value
        if old != value:
            await vt.dec(old)
        return root, False
    node.keys.insert(i, key)
    node.values.insert(i, value)
    return root, True


async def remove(store: Store, root: int, key: int, vt: ValueType) -> tuple[int, bool]:
    """Remove `key` if present (its value loses the tree's reference); return the new root
    and whether it was there."""
    if await lookup(store, root, key) is None:
        return root, False
    root, node = await store.shadow(root, vt)
    path: list[tuple[Node, int]] = []  # (internal node, child index taken)
    while not node.leaf:
        i = max(bisect.bisect_right(node.keys, key) - 1, 0)
        cb, child = await store.shadow(node.values[i], vt)
        node.values[i] = cb
        path.append((node, i))
        node = child
    i = bisect.bisect_left(node.keys, key)
    value = node.values.pop(i)
    del node.keys[i]
    await vt.dec(value)
    # Fix underfull nodes bottom-up with a neighbour.
    child = node
    for parent, i in reversed(path):
        if len(child.keys) >= child.capacity // 3:
            break
        await _rebalance(store, parent, i, vt)
        child = parent
    # A root left with one child gives way to it.
    top = await store.node(root)
    while not top.leaf and len(top.keys) == 1:
        only = top.values[0]
        store.forget(root)
        store.sm.dec(root)
        root, top = only, await store.node(only)
    return root, True


async def _rebalance(store: Store, parent: Node, i: int, vt: ValueType) -> None:
    """Child i of `parent` is under a third full: merge it with a neighbour, or share
    the entries of both evenly when they do not fit in one node."""
    j = i + 1 if i + 1 < len(parent.keys) else i - 1
    if j < 0:
        return
    lo, hi = min(i, j), max(i, j)
    lb, left = await store.shadow(parent.values[lo], vt)
    rb, right = await store.shadow(parent.values[hi], vt)
    parent.values[lo], parent.values[hi] = lb, rb
    keys, values = left.keys + right.keys, left.values + right.values
    if len(keys) <= left.capacity:
        left.keys, left.values = keys, values
        store.forget(rb)
        store.sm.dec(rb)
        del parent.keys[hi]
        del parent.values[hi]
        return
    half = len(keys) // 2
    left.keys, left.values = keys[:half], values[:half]
    right.keys, right.values = keys[half:], values[half:]
    parent.keys[hi] = right.keys[0]


async def delete_tree(store: Store, root: int, vt: ValueType) -> None:
    """Drop one reference to the tree at `root`; free what nobody else refers to."""
    if store.sm.get(root) > 1:
        store.sm.dec(root)
        return
    node = await store.node(root)
    if node.leaf:
        for v in node.values:
            await vt.dec(v)
    else:
        for child in node.values:
            await delete_tree(store, child, vt)
    store.forget(root)
    store.sm.dec(root)


def build(store: Store, pairs: list[tuple[int, int]], value_size: int) -> int:
    """A new tree holding sorted `pairs`, every node evenly filled (for the space maps'
    trees, which are rewritten whole at commit)."""
    flags = LEAF_NODE
    level = pairs
    size = value_size
    while True:
        cap = max_entries(size)
        count = max(1, -(-len(level) // cap))
        nodes: list[tuple[int, int]] = []
        for n in range(count):
            part = level[len(level) * n // count:len(level) * (n + 1) // count]
            b, _ = store.new_node(flags, size, [k for k, _ in part], [v for _, v in part])
            nodes.append((part[0][0] if part else 0, b))
        if count == 1:
            return nodes[0][1]
        level, flags, size = nodes, INTERNAL_NODE, 8


async def free_tree(store: Store, root: int) -> None:
    """Free a tree whose nodes nobody shares and whose values refer to nothing."""
    await delete_tree(store, root, ValueType(0))
