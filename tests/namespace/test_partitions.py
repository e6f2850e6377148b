"""Partition lookup against images made by real sfdisk (MBR, GPT) and disklabels we write."""

from __future__ import annotations

import errno
import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from minidisk.device.api import BlockDevice
from minidisk.namespace import DrivespecError, Namespace, apply, parse
from minidisk.namespace.partitions import (
    DISKMAGIC,
    PartitionError,
    disklabel_partition,
    numbered_partition,
)

Run = Callable[..., object]

MBR_SCRIPT = """label: dos
{img}1 : size=4MiB, type=83
{img}2 : size=16MiB, type=5
{img}5 : size=2MiB, type=83
{img}6 : size=3MiB, type=83
{img}3 : size=1MiB, type=83
"""
GPT_SCRIPT = """label: gpt
size=4MiB
size=8MiB
size=1MiB
"""


def sfdisk_image(path: Path, script: str) -> dict[int, tuple[int, int]]:
    """Partition a sparse 64 MiB image; returns sfdisk's own view {number: (offset, length)}."""
    with path.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(path)], input=script.format(img=path), text=True,
                   check=True, capture_output=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(path)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    sector = table["sectorsize"]
    return {int(p["node"][len(str(path)):]): (p["start"] * sector, p["size"] * sector)
            for p in table["partitions"]}


def reader(path: Path) -> Callable[[int, int], bytes]:
    data = path.read_bytes()
    return lambda offset, length: data[offset:offset + length]


async def read(device: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await device.pread(memoryview(buf), offset)
    return bytes(buf)


def mark(path: Path, offset: int, length: int, label: bytes) -> tuple[bytes, bytes]:
    """Write distinct 512-byte markers at the first and last sector of a region."""
    first, last = label.ljust(512, b"<"), label.ljust(512, b">")
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(first)
        f.seek(offset + length - 512)
        f.write(last)
    return first, last


def served_exactly(ns: Namespace, run: Run, path: Path, spec: str, offset: int,
                   length: int) -> None:
    """The drivespec serves [offset, offset+length) of `path`: the size and both end sectors."""
    first, last = mark(path, offset, length, spec.encode())
    key = parse(spec).key
    apply(parse(spec), ns)
    device = ns.lookup(key)
    assert device.size == length
    assert run(read(device, 0, 512)) == first
    assert run(read(device, length - 512, 512)) == last


@pytest.mark.parametrize(("kind", "script", "numbers"), [
    ("mbr", MBR_SCRIPT, [1, 2, 3, 5, 6]),
    ("gpt", GPT_SCRIPT, [1, 2, 3]),
])
def test_sfdisk_partitions(ns: Namespace, tmp_path: Path, run: Run, kind: str, script: str,
                           numbers: list[int]) -> None:
    image = tmp_path / f"{kind}.img"
    truth = sfdisk_image(image, script)
    assert sorted(truth) == numbers
    for number, (offset, length) in truth.items():
        found = numbered_partition(reader(image), number)
        assert (found.offset, found.length) == (offset, length)
    for number, (offset, length) in truth.items():
        if kind == "mbr" and number == 2:
            continue  # the extended partition holds the EBRs we are about to mark over
        served_exactly(ns, run, image, f"key=/{kind}{number},hostpath={image},partition={number}",
                       offset, length)
    for missing in (4, 7, 200) if kind == "mbr" else (4, 128, 129):
        with pytest.raises(PartitionError):
            numbered_partition(reader(image), missing)


def test_gpt_checksums_are_checked(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    sfdisk_image(image, GPT_SCRIPT)
    data = bytearray(image.read_bytes())
    data[1024 + 32] ^= 1  # first entry's first LBA, covered by the entry-array CRC
    with pytest.raises(PartitionError, match="entry table checksum"):
        numbered_partition(lambda o, n: bytes(data[o:o + n]), 1)
    data[1024 + 32] ^= 1
    data[512 + 40] ^= 1  # first usable LBA, covered by the header CRC
    with pytest.raises(PartitionError, match="header checksum"):
        numbered_partition(lambda o, n: bytes(data[o:o + n]), 1)


def test_no_partition_table(ns: Namespace, tmp_path: Path) -> None:
    image = tmp_path / "blank.img"
    image.write_bytes(bytes(1 << 20))
    with pytest.raises(DrivespecError, match="no MBR signature") as info:
        apply(parse(f"key=/p,hostpath={image},partition=1"), ns)
    assert (info.value.token, info.value.value, info.value.errno) == ("partition", "1",
                                                                      errno.ENOENT)
    with pytest.raises(DrivespecError, match="disklabel not found") as info:
        apply(parse(f"key=/p,hostpath={image},disklabel=a"), ns)
    assert info.value.token == "disklabel"
    with pytest.raises(DrivespecError) as info:
        apply(parse(f"key=/p,hostpath={tmp_path}/missing.img,partition=1"), ns)
    assert (info.value.token, info.value.errno) == ("hostpath", errno.ENOENT)
    assert not (tmp_path / "missing.img").exists()


def bsd_disklabel(order: str, partitions: list[tuple[int, int]], npartitions: int | None = None,
                  secsize: int = 512) -> bytes:
    """A NetBSD `struct disklabel` (sys/disklabel.h) with (p_size, p_offset) in sectors."""
    n = len(partitions) if npartitions is None else npartitions
    label = bytearray(148 + 16 * max(n, len(partitions)))
    struct.pack_into(order + "I", label, 0, DISKMAGIC)  # d_magic
    struct.pack_into(order + "I", label, 40, secsize)  # d_secsize
    struct.pack_into(order + "I", label, 132, DISKMAGIC)  # d_magic2
    struct.pack_into(order + "H", label, 138, n)  # d_npartitions
    for i, (size, offset) in enumerate(partitions):
        struct.pack_into(order + "II", label, 148 + 16 * i, size, offset)
    checksum = 0  # dkcksum: XOR of the 16-bit words, in the label's own byte order
    for (word,) in struct.iter_unpack(order + "H", label[:148 + 16 * n]):
        checksum ^= word
    struct.pack_into(order + "H", label, 136, checksum)
    return bytes(label)


FAR = 10_000_000  # sectors: 4.77 GiB, past what rump_server's uint32 byte arithmetic holds
LABEL_PARTITIONS = [(2048, 4096), (4096, 8192), (40960, 0), (0, 0), (2048, FAR)]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("where", [512, 4096 + 20])  # sector 1 (i386); any 4-byte boundary
def test_bsd_disklabel(ns: Namespace, tmp_path: Path, run: Run, order: str, where: int) -> None:
    image = tmp_path / "bsd.img"
    with image.open("wb") as f:
        f.truncate((FAR + 4096) * 512)  # sparse, ~4.8 GiB
        f.seek(where)
        f.write(bsd_disklabel(order, LABEL_PARTITIONS))
    for letter, (size, offset) in zip("abe", [LABEL_PARTITIONS[i] for i in (0, 1, 4)], strict=True):
        found = disklabel_partition(reader_sparse(image), letter)
        assert (found.offset, found.length) == (offset * 512, size * 512)
        served_exactly(ns, run, image, f"key=/{letter},hostpath={image},disklabel={letter}",
                       offset * 512, size * 512)
    for letter, message in (("d", "not available"), ("f", "not available"),
                            ("v", "not available")):
        with pytest.raises(PartitionError, match=message):
            disklabel_partition(reader_sparse(image), letter)


def reader_sparse(path: Path) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(length)
    return read_at


@pytest.mark.parametrize(("label", "message"), [
    (bsd_disklabel("<", [(8, 8)])[:136] + b"\x01\x00" + bsd_disklabel("<", [(8, 8)])[138:],
     "bad checksum"),
    (bsd_disklabel(">", [(8, 8)] * 23), "23 partitions"),
    (bsd_disklabel("<", [(8, 8)])[4:], "disklabel not found$"),  # d_magic cut off
])
def test_bad_disklabels(tmp_path: Path, label: bytes, message: str) -> None:
    image = tmp_path / "bad.img"
    image.write_bytes(bytes(512) + label + bytes(8192))
    with pytest.raises(PartitionError, match=message):
        disklabel_partition(reader(image), "a")


def test_disklabel_partition_past_the_end_of_the_file(ns: Namespace, tmp_path: Path) -> None:
    image = tmp_path / "short.img"
    image.write_bytes(bytes(512) + bsd_disklabel("<", [(100, 100)]) + bytes(4096))
    with pytest.raises(DrivespecError, match="disklabel=a: ") as info:
        apply(parse(f"key=/a,hostpath={image},disklabel=a"), ns)
    assert info.value.errno == errno.EINVAL
    assert image.stat().st_size == 512 + 148 + 16 + 4096  # a table never grows the file
