"""Data placement, checked in the backing host files against the kernel's arithmetic.

Writes go through mapped devices over FileDevice windows of host files; the test then reads
the host files directly (not through any device) and compares every sector with where
`stripe_map_sector` (MD/dm-stripe.c) or plain offset addition says it must be.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tests.dm.dm_helpers import SECTOR, pattern, read, run, write

from minidisk.device.file import FileDevice
from minidisk.dm import DeviceDict, Registry


def kernel_stripe_map(sector: int, stripes: int, chunk: int) -> tuple[int, int]:
    """MD/dm-stripe.c stripe_map_sector: (stripe, sector within that stripe's area)."""
    chunk_no, in_chunk = divmod(sector, chunk)
    stripe = chunk_no % stripes
    return stripe, (chunk_no // stripes) * chunk + in_chunk


def host_sector(path: Path, byte_offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(byte_offset)
        return f.read(SECTOR)


# (stripes, chunk sectors): powers of two, a non-power of two, and a single sector.
STRIPE_LAYOUTS = [(2, 8), (3, 24), (4, 1), (4, 128), (2, 7)]


@pytest.mark.parametrize("stripes,chunk", STRIPE_LAYOUTS)
def test_striped_placement_matches_kernel_formula(
    stripes: int, chunk: int, host_file: Callable[[str, int], Path],
    file_devices: Callable[..., FileDevice],
) -> None:
    width = chunk * stripes * 5  # five rows of chunks per stripe
    length = width * stripes
    # Each stripe lives in its own host file at an odd sector offset inside a window that
    # itself starts at an odd byte-aligned sector of the file.
    paths = [host_file(f"s{i}", (width + 64) * SECTOR) for i in range(stripes)]
    windows = {f"/dev/s{i}": file_devices(p, 3 * SECTOR) for i, p in enumerate(paths)}
    starts = [2 * i + 5 for i in range(stripes)]
    ns = DeviceDict(dict(windows))
    reg = Registry(ns, ns)
    args = " ".join(f"/dev/s{i} {starts[i]}" for i in range(stripes))
    data = pattern(stripes * 1000 + chunk, length * SECTOR)

    async def go() -> None:
        dev = await reg.create("st", f"0 {length} striped {stripes} {chunk} {args}")
        # Writes of odd sizes at odd offsets, crossing chunk and row boundaries.
        pos = 0
        step = 0
        while pos < length:
            n = min(length - pos, (step * 7) % (3 * chunk + 5) + 1)
            await write(dev, pos * SECTOR, data[pos * SECTOR:(pos + n) * SECTOR])
            pos += n
            step += 1
        await dev.flush()
        assert await read(dev, 0, length * SECTOR) == data
        # An unaligned read crossing several chunks comes back in order.
        assert await read(dev, 3 * SECTOR + 17, 5 * chunk * SECTOR) == \
            data[3 * SECTOR + 17:3 * SECTOR + 17 + 5 * chunk * SECTOR]

    run(go())
    for sector in range(length):
        stripe, at = kernel_stripe_map(sector, stripes, chunk)
        where = (3 + starts[stripe] + at) * SECTOR
        assert host_sector(paths[stripe], where) == data[sector * SECTOR:(sector + 1) * SECTOR], \
            f"sector {sector} not at stripe {stripe} sector {at}"


def test_linear_segments_place_data_at_their_offsets(
    host_file: Callable[[str, int], Path], file_devices: Callable[..., FileDevice],
) -> None:
    a, b = host_file("a", 256 * SECTOR), host_file("b", 256 * SECTOR)
    ns = DeviceDict({"/dev/a": file_devices(a), "/dev/b": file_devices(b, 7 * SECTOR)})
    reg = Registry(ns, ns)
    table = "0 100 linear /dev/a 31\n100 50 linear /dev/b 3\n150 10 linear /dev/a 0\n"
    data = pattern(7, 160 * SECTOR)

    async def go() -> None:
        dev = await reg.create("lin", table)
        assert dev.size == 160 * SECTOR
        # One write spanning all three segments, at an odd byte offset.
        await write(dev, 5, data[5:160 * SECTOR - 11])
        await write(dev, 0, data[:5])
        await write(dev, 160 * SECTOR - 11, data[-11:])
        assert await read(dev, 0, 160 * SECTOR) == data

    run(go())
    expected = [(a, 31 * SECTOR, 0, 100), (b, (7 + 3) * SECTOR, 100, 50), (a, 0, 150, 10)]
    for path, base, first, count in expected:
        for i in range(count):
            assert host_sector(path, base + i * SECTOR) == \
                data[(first + i) * SECTOR:(first + i + 1) * SECTOR]


def test_three_deep_stack_striped_over_linear_over_windows(
    host_file: Callable[[str, int], Path], file_devices: Callable[..., FileDevice],
) -> None:
    """striped (2 x 16) over two linear devices, each over a host-file window."""
    f0, f1 = host_file("h0", 600 * SECTOR), host_file("h1", 600 * SECTOR)
    ns = DeviceDict({"/dev/w0": file_devices(f0, 50 * SECTOR, 500 * SECTOR),
                     "/dev/w1": file_devices(f1, 10 * SECTOR, 500 * SECTOR)})
    reg = Registry(ns, ns)
    length = 2 * 16 * 12  # 384 sectors
    data = pattern(3, length * SECTOR)

    async def go() -> None:
        await reg.create("l0", "0 400 linear /dev/w0 9")
        await reg.create("l1", "0 400 linear /dev/w1 33")
        top = await reg.create(
            "top", f"0 {length} striped 2 16 /dev/mapper/l0 1 /dev/mapper/l1 4")
        await write(top, 0, data)
        assert await read(top, 0, len(data)) == data
        assert reg.info("l0").open_count == 1
        deps = [d.key for d in reg.deps("top")]
        assert deps == ["/dev/mapper/l1", "/dev/mapper/l0"]  # the kernel's order: last first

    run(go())
    # striped -> (stripe, s); linear l_i adds its start; the window adds its base.
    linear_start = [9, 33]
    window_base = [50, 10]
    stripe_start = [1, 4]
    for sector in range(length):
        stripe, at = kernel_stripe_map(sector, 2, 16)
        host = (window_base[stripe] + linear_start[stripe] + stripe_start[stripe] + at) * SECTOR
        assert host_sector((f0, f1)[stripe], host) == \
            data[sector * SECTOR:(sector + 1) * SECTOR], f"sector {sector}"
