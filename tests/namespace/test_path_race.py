"""Host paths below an exported directory are opened by descriptor, so a user who can write in
the tree cannot race a symlink between the checks and the open (issue 10, item 1).

The race tests flip a path component between a real directory (or file) and a symbolic link
to something outside the tree, with renameat2(RENAME_EXCHANGE) so that every lookup sees one
or the other, while the test opens the key as fast as it can until a deadline. Not one open
may reach the outside file. Each runs once with openat2 and once with the per-component
openat walk (the fallback for kernels without openat2).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import harness
from tests.nbd.nbd_helpers import run_libnbd

from minidisk.namespace import DrivespecError, Namespace, apply, parse

RACE_SECONDS = 4.0
INSIDE = b"inside"
SECRET = b"SECRET"

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE)."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Flipper:
    """A thread that swaps two names until stopped."""

    def __init__(self, a: Path, b: Path) -> None:
        self.a, self.b = a, b
        self.flips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            exchange(self.a, self.b)
            self.flips += 1

    def __enter__(self) -> Flipper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """tmp/tree (exported) with sub/f and f holding INSIDE; tmp/secret (0700, outside) with f
    holding SECRET; tmp/tree/sub_alt and tmp/tree/f_alt are symlinks to secret and secret/f,
    ready to be exchanged with sub and f."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(INSIDE)
    (tree / "f").write_bytes(INSIDE)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "f").write_bytes(SECRET)
    (secret / "f").chmod(0o600)
    (tree / "sub_alt").symlink_to(secret)
    (tree / "f_alt").symlink_to(secret / "f")
    yield tree


def race_namespace(tree: Path, name: str, flip: tuple[str, str]) -> tuple[int, int, int]:
    """(opened, refused, escaped): open export `name` of a dir_subdirs key over `tree` until
    the deadline while `flip` is exchanged, reading the first bytes each time."""
    ns = Namespace()
    ns.register("/t", str(tree), "dir_subdirs")
    opened = refused = escaped = 0

    async def scenario() -> None:
        nonlocal opened, refused, escaped
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            try:
                ref = ns.open_export(name)
            except OSError:
                refused += 1
                continue
            try:
                buf = bytearray(len(SECRET))
                await ref.device.pread(memoryview(buf), 0)
            finally:
                ref.close()
            opened += 1
            if bytes(buf) == SECRET:
                escaped += 1
            await asyncio.sleep(0)  # let the background close of the last one run
        await ns.aclose()

    with Flipper(tree / flip[0], tree / flip[1]) as flipper:
        asyncio.run(scenario())
    assert flipper.flips > 100  # the race really ran
    return opened, refused, escaped


@pytest.mark.timeout(60)
def test_intermediate_component_race_never_escapes(tree: Path, resolver: str) -> None:
    opened, refused, escaped = race_namespace(tree, "t/sub/f", ("sub", "sub_alt"))
    assert escaped == 0, f"{escaped} of {opened} opens read the file outside the tree"
    assert opened > 0 and refused > 0  # both states of the flip were seen


@pytest.mark.timeout(60)
def test_final_component_race_never_escapes(tree: Path, resolver: str) -> None:
    opened, refused, escaped = race_namespace(tree, "t/f", ("f", "f_alt"))
    assert escaped == 0, f"{escaped} of {opened} opens read the file outside the tree"
    assert opened > 0 and refused > 0


_NBD_RACE = """
import time
deadline = time.monotonic() + params["seconds"]
opened = refused = escaped = 0
while time.monotonic() < deadline:
    h = nbd.NBD()
    h.set_export_name(params["name"])
    try:
        h.connect_unix(params["sock"])
    except nbd.Error:
        refused += 1
        continue
    data = h.pread(len(params["secret"]), 0)
    h.shutdown()
    opened += 1
    if data == params["secret"].encode():
        escaped += 1
result = [opened, refused, escaped]
"""


@pytest.mark.timeout(120)
def test_race_through_a_real_nbd_client(tree: Path, short_tmp: Path) -> None:
    """The same race with libnbd connecting to a running server, once per open."""
    server = harness.serve(short_tmp, "-d", f"key=/t,hostpath={tree},type=dir_subdirs",
                           name="race")
    try:
        with Flipper(tree / "sub", tree / "sub_alt"):
            opened, refused, escaped = run_libnbd(
                _NBD_RACE, timeout=60, seconds=RACE_SECONDS, name="t/sub/f",
                sock=server.socket, secret=SECRET.decode())
    finally:
        server.stop()
    assert escaped == 0, f"{escaped} of {opened} NBD connections read the file outside the tree"
    assert opened > 0 and refused > 0


# Single-shot refusals: what the race tests flip between, one state at a time.

@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = Namespace()
    yield namespace
    asyncio.run(namespace.aclose())


def open_fails(ns: Namespace, name: str) -> int:
    with pytest.raises(OSError) as info:
        ref = ns.open_export(name)
        ref.close()
    return info.value.errno or 0


def test_symlink_as_final_component_is_refused(ns: Namespace, tree: Path, resolver: str) -> None:
    ns.register("/t", str(tree), "dir_subdirs")
    assert open_fails(ns, "t/f_alt") == errno.ENOENT


def test_symlink_as_intermediate_component_is_refused(ns: Namespace, tree: Path,
                                                      resolver: str) -> None:
    ns.register("/t", str(tree), "dir_subdirs")
    assert open_fails(ns, "t/sub_alt/f") == errno.ENOENT


@pytest.mark.timeout(20)
def test_fifo_in_the_tree_is_refused_without_blocking(ns: Namespace, tree: Path,
                                                      resolver: str) -> None:
    os.mkfifo(tree / "fifo")
    ns.register("/t", str(tree), "dir_subdirs")
    assert open_fails(ns, "t/fifo") == errno.ENOENT


def test_device_node_in_the_tree_is_refused(ns: Namespace, tree: Path, resolver: str) -> None:
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
    ns.register("/t", str(tree), "dir_subdirs")
    assert open_fails(ns, "t/null") == errno.ENOENT


def test_directory_key_keeps_its_directory_when_an_ancestor_moves(
        ns: Namespace, tree: Path, tmp_path: Path) -> None:
    """The key holds its directory open: renaming the tree away and planting a symlink to
    another directory in its place does not redirect it."""
    ns.register("/t", str(tree), "dir_subdirs")
    tree.rename(tmp_path / "moved")
    tree.symlink_to(tmp_path / "secret")

    async def read_f() -> bytes:
        ref = ns.open_export("t/f")
        try:
            buf = bytearray(len(INSIDE))
            await ref.device.pread(memoryview(buf), 0)
            return bytes(buf)
        finally:
            ref.close()

    assert asyncio.run(read_f()) == INSIDE


@pytest.mark.timeout(60)
def test_drivespec_create_and_grow_race_never_touches_the_outside(tmp_path: Path,
                                                                   resolver: str) -> None:
    """apply (create or grow work/sub/disk.img to 1 MiB) and undo, as fast as they go, while
    work/sub flips between a real directory and a link to a directory holding a 4 KiB
    disk.img of its own: that file is never grown, cut or removed, and nothing appears there."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    victim = outside / "disk.img"
    victim.write_bytes(b"v" * 4096)
    os.utime(victim, (1_000_000_000, 1_000_000_000))
    (work / "sub_alt").symlink_to(outside)
    spec = parse(f"key=/d,hostpath={work}/sub/disk.img,size=1m")
    applied = refused = 0
    undo_errors: list[OSError] = []
    ns = Namespace()

    async def scenario() -> None:
        nonlocal applied, refused
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            try:
                done = apply(spec, ns)
            except DrivespecError:
                refused += 1
                continue
            applied += 1
            try:
                await done.undo(ns)
            except OSError as e:  # counted: the outside file is what this test is about
                undo_errors.append(e)
        await ns.aclose()

    with Flipper(work / "sub", work / "sub_alt") as flipper:
        asyncio.run(scenario())
    assert flipper.flips > 100
    st = victim.stat()
    assert (st.st_size, st.st_mtime) == (4096, 1_000_000_000), "the outside file was touched"
    assert victim.read_bytes() == b"v" * 4096
    assert os.listdir(outside) == ["disk.img"]
    assert not undo_errors
    assert applied > 0 and refused > 0
