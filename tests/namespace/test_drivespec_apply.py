"""Applying drivespecs: file creation, sparse growth, errors that leave nothing behind."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minidisk.namespace import DrivespecError, Namespace, apply, apply_all, parse

Run = Callable[..., object]
MakeFile = Callable[..., Path]


def apply_text(text: str, ns: Namespace) -> None:
    apply(parse(text), ns)


def error_of(text: str, ns: Namespace) -> DrivespecError:
    with pytest.raises(DrivespecError) as info:
        apply_text(text, ns)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600),
                                            (0o000, 0o644), (0o222, 0o444)])
def test_created_file_mode_is_0644_under_umask(ns: Namespace, tmp_path: Path,
                                              umask: Callable[[int], None], mask: int,
                                              mode: int) -> None:
    umask(mask)
    apply_text(f"key=/d,hostpath={tmp_path}/new.img,size=64k", ns)
    assert stat.S_IMODE(os.stat(tmp_path / "new.img").st_mode) == mode


def test_new_file_is_extended_sparsely(ns: Namespace, tmp_path: Path) -> None:
    apply_text(f"key=/d,hostpath={tmp_path}/big.img,size=4g,offset=1g", ns)
    st = os.stat(tmp_path / "big.img")
    assert st.st_size == 5 << 30
    assert st.st_blocks * 512 < 1 << 20
    assert ns.lookup("/d").size == 4 << 30


def test_short_file_keeps_its_data_and_grows_sparsely(ns: Namespace, make_file: MakeFile,
                                                      pattern: Callable[..., bytes]) -> None:
    host = make_file("short.img", 8192)
    blocks_before = os.stat(host).st_blocks
    apply_text(f"key=/d,hostpath={host},size=1g,type=chr", ns)
    st = os.stat(host)
    assert st.st_size == 1 << 30
    assert st.st_blocks == blocks_before
    assert host.open("rb").read(8192) == pattern(8192, 1)


def test_longer_file_is_not_touched(ns: Namespace, make_file: MakeFile) -> None:
    host = make_file("long.img", 1 << 20)
    apply_text(f"key=/d,hostpath={host},size=64k,offset=4k", ns)
    assert os.stat(host).st_size == 1 << 20
    assert ns.lookup("/d").size == 64 << 10


def test_reg_without_size_runs_to_the_end(ns: Namespace, make_file: MakeFile) -> None:
    host = make_file("f.img", 10000)
    apply_text(f"key=/r,hostpath={host},type=reg,offset=1000", ns)
    assert ns.lookup("/r").size == 9000
    assert os.stat(host).st_size == 10000


def test_size_host(ns: Namespace, make_file: MakeFile, tmp_path: Path) -> None:
    host = make_file("f.img", 3 << 20)
    apply_text(f"key=/h,hostpath={host},size=host", ns)
    assert ns.lookup("/h").size == 3 << 20
    (tmp_path / "empty.img").touch()
    e = error_of(f"key=/e,hostpath={tmp_path}/empty.img,size=host", ns)
    assert (e.token, e.value) == ("size", "host") and "empty" in str(e)
    e = error_of(f"key=/m,hostpath={tmp_path}/missing.img,size=host", ns)
    assert (e.token, e.errno) == ("hostpath", errno.ENOENT)
    assert not (tmp_path / "missing.img").exists()  # size=host never creates


@pytest.mark.parametrize("kind", ["blk", "chr", "reg"])
def test_hostpath_that_is_a_directory(ns: Namespace, tmp_path: Path, kind: str) -> None:
    e = error_of(f"key=/d,hostpath={tmp_path},size=1m,type={kind}", ns)
    assert (e.token, e.value, e.errno) == ("hostpath", str(tmp_path), errno.EISDIR)
    assert str(e).startswith(f"hostpath={tmp_path}: ")


def test_hostpath_that_is_neither_file_nor_block_device(ns: Namespace, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    e = error_of(f"key=/d,hostpath={tmp_path}/fifo,size=1m", ns)
    assert e.token == "hostpath" and "neither" in str(e)
    e = error_of("key=/d,hostpath=/dev/null,size=1m", ns)
    assert e.token == "hostpath"


def test_missing_parent_directory(ns: Namespace, tmp_path: Path) -> None:
    e = error_of(f"key=/d,hostpath={tmp_path}/no/such/dir.img,size=1m", ns)
    assert (e.token, e.errno) == ("hostpath", errno.ENOENT)


def test_directory_types(ns: Namespace, tmp_path: Path, make_file: MakeFile) -> None:
    make_file("inside.img", 4096)
    apply_text(f"key=/dir,hostpath={tmp_path},type=dir", ns)
    assert ns.lookup("/dir/inside.img").size == 4096
    e = error_of(f"key=/other,hostpath={tmp_path}/inside.img,type=dir_subdirs", ns)
    assert (e.token, e.errno) == ("hostpath", errno.ENOTDIR)
    e = error_of(f"key=/dir/x,hostpath={tmp_path}/y.img,size=1m", ns)
    assert (e.token, e.errno) == ("key", errno.EEXIST)
    assert not (tmp_path / "y.img").exists()


def test_duplicate_key_creates_nothing(ns: Namespace, tmp_path: Path) -> None:
    apply_text(f"key=/d,hostpath={tmp_path}/a.img,size=1m", ns)
    e = error_of(f"key=//d,hostpath={tmp_path}/b.img,size=1m", ns)
    assert (e.token, e.value, e.errno) == ("key", "/d", errno.EEXIST)
    assert not (tmp_path / "b.img").exists()


def test_window_past_the_end_removes_the_file_it_created(ns: Namespace, tmp_path: Path) -> None:
    e = error_of(f"key=/d,hostpath={tmp_path}/new.img,type=reg,offset=1k", ns)
    assert (e.token, e.value, e.errno) == ("offset", "1024", errno.EINVAL)
    assert not (tmp_path / "new.img").exists()
    assert ns.ls() == []


def test_huge_offset(ns: Namespace, tmp_path: Path) -> None:
    """4 EiB: ext4 (our CI) refuses the file size; a file system that takes it serves it."""
    host = tmp_path / "huge.img"
    text = f"key=/d,hostpath={host},size=1m,offset={1 << 62}"
    try:
        apply_text(text, ns)
    except DrivespecError as e:
        assert (e.token, e.value, e.errno) == ("offset", str(1 << 62), errno.EFBIG)
        assert "cannot extend" in str(e)
        assert not host.exists()
    else:
        assert os.stat(host).st_size == (1 << 62) + (1 << 20)
        assert ns.lookup("/d").size == 1 << 20


def test_apply_all_is_all_or_nothing(ns: Namespace, tmp_path: Path, make_file: MakeFile,
                                     run: Run) -> None:
    grown = make_file("grown.img", 4096)
    specs = [f"key=/a,hostpath={tmp_path}/created.img,size=1m",
             f"key=/b,hostpath={grown},size=1m",
             f"key=/c,hostpath={tmp_path},size=1m"]  # a directory: fails after the others
    with pytest.raises(DrivespecError, match=f"hostpath={tmp_path}: ") as info:
        run(apply_all(specs, ns))
    assert info.value.token == "hostpath"
    assert not (tmp_path / "created.img").exists()
    assert os.stat(grown).st_size == 4096
    assert ns.ls() == []
    # A syntax error anywhere means nothing is applied at all.
    with pytest.raises(DrivespecError, match="size already given"):
        run(apply_all([specs[0], "key=/x,hostpath=y,size=1,size=2"], ns))
    assert not (tmp_path / "created.img").exists()
    applied = run(apply_all(specs[:2], ns))
    assert [a.key for a in applied] == ["/a", "/b"]  # type: ignore[attr-defined]
    assert ns.export_names() == ["a", "b"]


NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that uid `nobody` can search (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="md-perm-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def test_permissions_as_an_unprivileged_user(shared_dir: Path, make_file: MakeFile) -> None:
    """Root ignores permission bits, so this runs in a child that drops to uid/gid 65534.

    The child imports minidisk first (the venv need not be readable by nobody), then setgid
    and setuid, then applies drivespecs and prints one line per case.
    """
    unreadable = shared_dir / "unreadable.img"
    unreadable.write_bytes(bytes(4096))
    unreadable.chmod(0o000)
    read_only = shared_dir / "read-only.img"
    read_only.write_bytes(bytes(4096))
    read_only.chmod(0o444)
    script = textwrap.dedent(f"""
        import os
        from minidisk.namespace import DrivespecError, Namespace, apply, parse
        os.setgroups([])
        os.setgid({NOBODY})
        os.setuid({NOBODY})
        ns = Namespace()
        for text in ["key=/u,hostpath={unreadable},size=host",
                     "key=/c,hostpath={shared_dir}/cannot-create.img,size=1m",
                     "key=/g,hostpath={read_only},size=1m",
                     "key=/r,hostpath={read_only},size=host"]:
            try:
                apply(parse(text), ns)
            except DrivespecError as e:
                print("error", e.token, e.errno)
            else:
                print("ok", ns.lookup(parse(text).key).caps.read_only)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")
    assert out[:4] == [
        f"error hostpath {errno.EACCES}",  # no read permission
        f"error hostpath {errno.EACCES}",  # cannot create in a root-owned 0755 directory
        f"error size {errno.EACCES}",  # too short, and growing it needs write permission
        "ok True",  # readable only: served read-only, as rumpblk falls back
    ]
    assert not (shared_dir / "cannot-create.img").exists()
    assert os.stat(read_only).st_size == 4096
