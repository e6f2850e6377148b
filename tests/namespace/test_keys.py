"""Key rules (rump_etfs, with the '/' boundary for directory keys), windows and host-file kinds."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from minidisk.namespace import RUMP_ETFS_SIZE_ENDOFF, Namespace, canonical_key


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno is not None
    return info.value.errno


@pytest.mark.parametrize(("key", "canonical"), [
    ("/a", "/a"), ("//a", "/a"), ("////a/b", "/a/b"), ("/a//b", "/a//b"), ("/a/", "/a/"),
    ("/a/./b", "/a/./b"), ("/ spaced ", "/ spaced "), ("/dev/mapper/x", "/dev/mapper/x"),
])
def test_canonical_key(key: str, canonical: str) -> None:
    assert canonical_key(key) == canonical


@pytest.mark.parametrize(("key", "code"), [
    ("", errno.EINVAL), ("a", errno.EINVAL), ("a/b", errno.EINVAL), (" /a", errno.EINVAL),
    ("/", errno.EINVAL), ("///", errno.EINVAL), ("/a\0b", errno.EINVAL),
    ("/" + "x" * 4097, errno.ENAMETOOLONG),
])
def test_bad_keys(key: str, code: int) -> None:
    assert errno_of(lambda: canonical_key(key)) == code


def test_leading_slashes_collapse_and_the_rest_is_verbatim(
        ns: Namespace, make_file: Callable[..., Path]) -> None:
    f = str(make_file("f", 4096))
    assert ns.register("//k", f, "reg") == "/k"
    assert errno_of(lambda: ns.register("/k", f, "reg")) == errno.EEXIST
    assert errno_of(lambda: ns.register("///k", f, "reg")) == errno.EEXIST
    assert ns.lookup("////k") is ns.lookup("/k")
    ns.register("/k/p", f, "reg")
    ns.register("/k//p", f, "reg")  # a different key
    assert ns.lookup("/k/p") is not ns.lookup("/k//p")
    assert errno_of(lambda: ns.lookup("/k/")) == errno.ENOENT
    assert errno_of(lambda: ns.lookup("k")) == errno.EINVAL
    assert errno_of(lambda: ns.register("k2", f, "reg")) == errno.EINVAL


def test_unknown_key(ns: Namespace, run: Callable[..., object]) -> None:
    assert errno_of(lambda: ns.lookup("/nothing")) == errno.ENOENT
    assert errno_of(lambda: run(ns.remove("/nothing"))) == errno.ENOENT
    assert errno_of(lambda: run(ns.remove("nothing"))) == errno.EINVAL


def test_directory_key_collisions(ns: Namespace, tmp_path: Path,
                                  make_file: Callable[..., Path]) -> None:
    f = str(make_file("f", 4096))
    d = str(tmp_path)
    ns.register("/foo", d, "dir")
    ns.register("/foobar", f, "reg")  # no '/' boundary: not under /foo (NetBSD would match)
    assert errno_of(lambda: ns.register("/foo/x", f, "reg")) == errno.EEXIST
    assert errno_of(lambda: ns.register("//foo/x", f, "reg")) == errno.EEXIST
    assert errno_of(lambda: ns.register("/foo/sub", d, "dir_subdirs")) == errno.EEXIST
    assert errno_of(lambda: ns.register("/foo", f, "reg")) == errno.EEXIST
    ns.register("/fo", d, "dir_subdirs")  # a prefix of /foo as a string, not as a path
    ns.register("/bar/x", f, "reg")
    assert errno_of(lambda: ns.register("/bar", d, "dir")) == errno.EEXIST  # would cover /bar/x
    ns.register("/plain", f, "reg")
    ns.register("/plain/below", f, "reg")  # a plain key is not a directory
    assert errno_of(lambda: ns.lookup("/foobar/x")) == errno.ENOENT
    assert ns.lookup("/foobar").size == 4096


def test_directory_keys_need_directories_and_no_window(
        ns: Namespace, tmp_path: Path, make_file: Callable[..., Path]) -> None:
    f = str(make_file("f", 4096))
    assert errno_of(lambda: ns.register("/d", f, "dir")) == errno.ENOTDIR
    assert errno_of(lambda: ns.register("/d", str(tmp_path / "missing"), "dir")) == errno.ENOTDIR
    assert errno_of(lambda: ns.register("/d", str(tmp_path), "dir", 0, 4096)) == errno.EISDIR
    assert errno_of(lambda: ns.register("/d", str(tmp_path), "dir_subdirs", 1)) == errno.EISDIR
    assert errno_of(lambda: ns.register("/d", str(tmp_path), "tree")) == errno.EINVAL
    assert ns.ls() == []


def test_host_file_kinds(ns: Namespace, tmp_path: Path) -> None:
    for kind in ("reg", "blk", "chr"):
        assert errno_of(partial(ns.register, "/d", str(tmp_path), kind)) == errno.EISDIR
    os.mkfifo(tmp_path / "fifo")  # refused before open(), which would block
    assert errno_of(lambda: ns.register("/p", str(tmp_path / "fifo"), "reg")) == errno.EINVAL
    assert errno_of(lambda: ns.register("/m", str(tmp_path / "missing"), "reg")) == errno.ENOENT
    assert ns.ls() == []


@pytest.mark.parametrize("kind", ["reg", "blk", "chr"])
def test_window_checks(ns: Namespace, make_file: Callable[..., Path], kind: str) -> None:
    f = str(make_file("f", 8192))
    assert errno_of(lambda: ns.register("/a", f, kind, 8193)) == errno.EINVAL
    assert errno_of(lambda: ns.register("/a", f, kind, 0, 8193)) == errno.EINVAL
    assert errno_of(lambda: ns.register("/a", f, kind, 4096, 4097)) == errno.EINVAL
    assert errno_of(lambda: ns.register("/a", f, kind, 1, RUMP_ETFS_SIZE_ENDOFF - 1)) \
        == errno.EINVAL
    ns.register("/end", f, kind, 8192)  # begin at the very end: an empty window
    assert ns.lookup("/end").size == 0
    ns.register("/tail", f, kind, 1024, RUMP_ETFS_SIZE_ENDOFF)
    assert ns.lookup("/tail").size == 7168
    ns.register("/exact", f, kind, 4096, 4096)
    assert ns.lookup("/exact").size == 4096
    assert [row.key for row in ns.ls()] == ["/end", "/tail", "/exact"]


def test_sector_types_round_down_to_whole_sectors(
        ns: Namespace, make_file: Callable[..., Path]) -> None:
    for kind in ("blk", "chr"):  # a file each: uncached and cached windows may not overlap
        ns.register("/" + kind, str(make_file(kind, 5000)), kind, 100)
        assert ns.lookup("/" + kind).size == 4608  # 4900 bytes, 9 whole sectors
        assert ns.lookup("/" + kind).block_size.minimum == 512
    ns.register("/reg", str(make_file("chr", 5000)), "reg", 100)
    assert ns.lookup("/reg").size == 4900
    assert ns.lookup("/reg").block_size.minimum == 1
