"""Operator host paths (drivespecs, `etfs register`) are opened by descriptor with symbolic
links refused, so a link planted in the path cannot make root create, grow, truncate, remove
or export a file elsewhere; `symlinks=follow` follows them on purpose (issue 10, item 1)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from minidisk.namespace import DrivespecError, Namespace, apply, parse

OLD = 1_000_000_000  # an mtime far in the past, so any change to the file shows


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the operator's directory that root must not touch: 4 KiB, old mtime."""
    outside = tmp_path / "outside"
    outside.mkdir()
    f = outside / "victim.img"
    f.write_bytes(b"v" * 4096)
    os.utime(f, (OLD, OLD))
    return f


def untouched(f: Path) -> bool:
    st = f.stat()
    return st.st_size == 4096 and st.st_mtime == OLD and f.read_bytes() == b"v" * 4096


def refusal(text: str, ns: Namespace) -> DrivespecError:
    with pytest.raises(DrivespecError) as info:
        apply(parse(text), ns)
    return info.value


def test_drivespec_over_a_symlink_is_refused_and_the_target_untouched(
        ns: Namespace, tmp_path: Path, victim: Path, resolver: str) -> None:
    link = tmp_path / "disk.img"
    link.symlink_to(victim)
    error = refusal(f"key=/d,hostpath={link},size=1m", ns)
    assert error.errno == errno.ELOOP
    assert str(error).startswith(f"hostpath={link}: ") and "symlinks=follow" in str(error)
    assert "\n" not in str(error)
    assert untouched(victim)
    assert ns.export_names() == []


def test_drivespec_through_a_symlinked_directory_creates_nothing(
        ns: Namespace, tmp_path: Path, victim: Path, resolver: str) -> None:
    (tmp_path / "images").symlink_to(victim.parent)
    error = refusal(f"key=/d,hostpath={tmp_path}/images/new.img,size=1m", ns)
    assert error.errno == errno.ELOOP and f"({tmp_path}/images)" in str(error)
    assert sorted(os.listdir(victim.parent)) == ["victim.img"]
    error = refusal(f"key=/d,hostpath={tmp_path}/images/victim.img,size=1m", ns)
    assert untouched(victim)


def test_drivespec_follows_a_symlink_when_asked(ns: Namespace, tmp_path: Path,
                                                victim: Path) -> None:
    link = tmp_path / "disk.img"
    link.symlink_to(victim)
    apply(parse(f"key=/d,hostpath={link},size=1m,symlinks=follow"), ns)
    assert victim.stat().st_size == 1 << 20  # grown, as the operator asked
    assert ns.export_names() == ["d"]


def test_drivespec_symlinks_token_is_checked() -> None:
    with pytest.raises(DrivespecError) as info:
        parse("key=/d,hostpath=x,size=1m,symlinks=yes")
    assert str(info.value).startswith("symlinks=yes: unknown policy")
    assert parse("key=/d,hostpath=x,size=1m,symlinks=follow").follow_symlinks
    spec = parse("key=/d,hostpath=x,size=1m,symlinks=follow")
    assert parse(spec.format()) == spec


def test_undo_removes_only_the_file_it_created(ns: Namespace, tmp_path: Path,
                                               victim: Path) -> None:
    """After apply created dir/new.img, dir is replaced by a link to a directory holding a
    file of the same name: undo must not remove that file."""
    work = tmp_path / "work"
    work.mkdir()
    applied = apply(parse(f"key=/d,hostpath={work}/new.img,size=64k"), ns)
    assert applied.created_file
    same_name = victim.parent / "new.img"
    same_name.write_bytes(b"keep")
    work.rename(tmp_path / "work.moved")
    work.symlink_to(victim.parent)
    asyncio.run(applied.undo(ns))
    assert same_name.read_bytes() == b"keep"


def test_undo_cuts_back_only_the_file_it_grew(ns: Namespace, tmp_path: Path,
                                              victim: Path) -> None:
    """After apply grew disk.img, it is replaced by a link to another file: undo must not
    truncate that file."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"d" * 512)
    applied = apply(parse(f"key=/d,hostpath={disk},size=64k"), ns)
    assert applied.grown_from == 512
    big = victim.parent / "big.img"
    big.write_bytes(b"b" * 65536)
    disk.rename(tmp_path / "disk.moved")
    disk.symlink_to(big)
    asyncio.run(applied.undo(ns))
    assert big.read_bytes() == b"b" * 65536


@pytest.mark.parametrize("kind", ["reg", "blk", "chr"])
def test_plain_register_over_a_symlink_is_refused(ns: Namespace, tmp_path: Path,
                                                  victim: Path, kind: str,
                                                  resolver: str) -> None:
    """What `etfs register KEY PATH` (and its control command) does."""
    link = tmp_path / "disk.img"
    link.symlink_to(victim)
    with pytest.raises(OSError) as info:
        ns.register("/k", str(link), kind)
    assert info.value.errno == errno.ELOOP
    assert str(info.value.strerror).startswith(f"{link}: a symbolic link is not followed")
    ns.register("/k", str(link), kind, follow_symlinks=True)
    assert ns.export_names() == ["k"]


def test_directory_key_over_a_symlink_is_refused(ns: Namespace, tmp_path: Path,
                                                 victim: Path) -> None:
    (tmp_path / "tree").symlink_to(victim.parent)
    with pytest.raises(OSError) as info:
        ns.register("/t", str(tmp_path / "tree"), "dir")
    assert info.value.errno == errno.ELOOP
    apply(parse(f"key=/t,hostpath={tmp_path}/tree,type=dir,symlinks=follow"), ns)
    ref = ns.open_export("t/victim.img")
    ref.close()


@pytest.mark.timeout(20)
def test_plain_register_over_a_fifo_does_not_block(ns: Namespace, tmp_path: Path,
                                                   resolver: str) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError) as info:
        ns.register("/k", str(tmp_path / "fifo"), "reg")
    assert info.value.errno == errno.EINVAL
    error = refusal(f"key=/k,hostpath={tmp_path}/fifo,size=1m", ns)
    assert error.errno == errno.EINVAL


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_leaks_on_refusals_and_removal(tmp_path: Path, victim: Path,
                                                     resolver: str) -> None:
    """Every refused open and every removed key gives its descriptors back."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"f" * 4096)
    (tree / "link").symlink_to(victim)
    os.mkfifo(tree / "fifo")
    before = open_fds()
    ns = Namespace()

    async def scenario() -> None:
        ns.register("/t", str(tree), "dir_subdirs")
        for _ in range(50):
            for name in ("t/link", "t/fifo", "t/sub", "t/missing/f", "t/link/x"):
                with pytest.raises(OSError):
                    ns.open_export(name)
            ns.open_export("t/sub/f").close()
            for spec in (f"key=/b,hostpath={tree}/sub/f,disklabel=a",  # no label
                         f"key=/b,hostpath={tree}/link,size=1k",
                         f"key=/b,hostpath={tree}/fifo,size=1k"):
                with pytest.raises(DrivespecError):
                    apply(parse(spec), ns)
            past_end = (str(victim), "blk", 1 << 20, 512)
            with pytest.raises(OSError):
                ns.register("/c", *past_end)  # no cache for the file yet
            ns.register("/a", str(victim), "blk")
            with pytest.raises(OSError):
                ns.register("/c", *past_end)  # the file's cache exists
            with pytest.raises(OSError):
                ns.register("/c", str(victim), "reg")  # overlaps the cached windows
            ns.register("/b", str(victim), "blk")
            await ns.remove("/a")
            await ns.remove("/b")
        await asyncio.sleep(0)  # the background close of the last file below /t
        await ns.aclose()

    asyncio.run(scenario())
    assert open_fds() == before
