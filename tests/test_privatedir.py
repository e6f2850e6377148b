"""privatedir: where root keeps state, nobody else may redirect it; a sticky parent is fine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minidisk.privatedir import UntrustedDirectory, private_dir, state_root


@pytest.fixture
def sticky(tmp_path: Path) -> Path:
    """A /tmp-like directory: root's, world-writable, sticky."""
    d = tmp_path / "tmp"
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


def test_a_missing_directory_is_made_below_a_sticky_one(sticky: Path) -> None:
    # Before: the sticky parent was judged as if it were the state directory itself.
    made = private_dir(sticky / "state" / "attach")
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
    assert (sticky / "state").stat().st_mode & 0o777 == 0o755


def test_an_existing_directory_others_may_write_is_refused(sticky: Path) -> None:
    with pytest.raises(UntrustedDirectory, match="can be changed or read by others"):
        private_dir(sticky)


def test_a_world_writable_parent_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(UntrustedDirectory, match=str(open_dir)):
        private_dir(open_dir / "state")


def test_a_directory_of_another_user_is_refused(sticky: Path) -> None:
    planted = sticky / "state"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    with pytest.raises(UntrustedDirectory, match="uid 65534"):
        private_dir(planted)


def test_our_own_directory_that_others_may_only_read_is_narrowed(tmp_path: Path) -> None:
    # Before: /run/minidisk/attach, made 0755 by an older minidisk, failed every attach.
    old = tmp_path / "attach"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    assert private_dir(old) == old
    assert old.stat().st_mode & 0o777 == 0o700


def test_state_root_is_the_users_own_unless_set(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """A user's `minidisk link` once tried root's /run/minidisk and died of EACCES there."""
    monkeypatch.delenv("MINIDISK_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert state_root() == Path("/run/minidisk")
    monkeypatch.setattr(os, "geteuid", lambda: 2702)
    assert state_root() == Path("/tmp/minidisk-2702")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # root's, as sudo leaves it
    assert state_root() == Path("/tmp/minidisk-2702")
    os.chown(tmp_path, 2702, -1)  # the user's own
    assert state_root() == tmp_path / "minidisk"
    monkeypatch.setenv("MINIDISK_STATE_DIR", "/srv/state")
    assert state_root() == Path("/srv/state")
