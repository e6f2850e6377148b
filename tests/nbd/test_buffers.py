"""The payload buffer pool (nbd/buffers.py): a buffer anything still has a view of is never
handed out again; a free one is, without a new allocation; what pools hold is bounded per
connection and per event loop."""

from __future__ import annotations

from minidisk.nbd.buffers import MAX_POOLED, MIN_POOLED, BufferPool, PoolLimit, unreferenced

MiB = 1 << 20


def test_a_buffer_is_free_only_when_no_view_of_it_is_left() -> None:
    buf = bytearray(MiB)
    assert unreferenced(buf) and len(buf) == MiB
    view = memoryview(buf)
    part = view[10:20]  # a view of the view: what a device or the transport may hold
    del view
    assert not unreferenced(buf)
    del part
    assert unreferenced(buf) and len(buf) == MiB
    buf[-1] = 7
    assert unreferenced(buf) and len(buf) == MiB  # the probe leaves the size, not the byte
    raw = memoryview(buf).cast("B")  # a consumer that took the buffer protocol itself
    assert not unreferenced(buf)
    raw.release()
    assert unreferenced(buf)


def test_a_buffer_in_use_is_not_handed_out_and_a_free_one_is() -> None:
    pool = BufferPool(PoolLimit())
    first = pool.take(MiB)
    in_flight = memoryview(first)  # e.g. still in the transport's write queue
    pool.give(first)
    second = pool.take(MiB)
    assert second is not first
    del in_flight
    assert pool.take(MiB) is first
    assert pool.held == 0


def test_small_and_huge_buffers_are_not_kept() -> None:
    pool = BufferPool(PoolLimit())
    for size in (MIN_POOLED - 1, MAX_POOLED + 1, 4096):
        pool.give(bytearray(size))
    assert pool.held == 0 and pool.take(MIN_POOLED - 1) is not None


def test_the_pools_of_a_loop_are_bounded_together() -> None:
    shared = PoolLimit(limit=3 * MiB)
    a, b = BufferPool(shared, limit=2 * MiB), BufferPool(shared, limit=2 * MiB)
    for _ in range(4):
        a.give(bytearray(MiB))
        b.give(bytearray(MiB))
    assert a.held == 2 * MiB and b.held == MiB and shared.held == 3 * MiB
    a.clear()  # the connection closed
    assert shared.held == MiB
    b.give(bytearray(2 * MiB))  # another size makes room
    assert set(b.free) == {2 * MiB} and b.held == 2 * MiB == shared.held
