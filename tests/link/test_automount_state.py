"""The link state root keeps (and acts on: umount, detach, kill the keeper) cannot be planted
by a user: a state directory that is a symlink, or a directory a user owns, is refused before
anything is written, and so is a mount path below a directory others can change."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.harness import MINIDISK
from tests.link.link_helpers import Site

from minidisk.link import linker

USER = 60001


@contextlib.contextmanager
def user_writable_state(site: Site) -> Iterator[Path]:
    """A MINIDISK_STATE_DIR whose directory a user owns (as when an administrator points it
    into a shared place): that user may put anything in it before root comes."""
    state = site.root / "shared-state"
    state.mkdir()
    os.chown(state, USER, USER)
    try:
        yield state
    finally:
        for planted in state.rglob("*.json"):  # what root wrote there, before the fix
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                os.kill(json.loads(planted.read_text())["keeper"]["pid"], signal.SIGKILL)


def link_with_state(site: Site, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MINIDISK, "link", "alice.0192", "--no-attach"], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, **site.env, "MINIDISK_STATE_DIR": str(state)})


@pytest.mark.parametrize("planted", ["symlink", "directory"])
def test_a_planted_state_directory_is_refused(site: Site, tmp_path: Path,
                                              planted: str) -> None:
    site.cli("directory", "grant", "root", "alice.0192", "--mode", "R", check=True)
    site.cli("directory", "grant", "nobody", "alice.0192", "--mode", "W", check=True)
    with user_writable_state(site) as state:
        elsewhere = tmp_path / "elsewhere"  # where root would have been led to write
        elsewhere.mkdir()
        if planted == "symlink":
            (state / "link").symlink_to(elsewhere)
        else:
            (state / "link").mkdir(mode=0o755)
            os.chown(state / "link", USER, USER)
        done = link_with_state(site, state)
        assert done.returncode != 0 and "refusing to keep link state there" in done.stderr, \
            done
        assert not list(elsewhere.iterdir()) and not list((state / "link").iterdir())
        site.wait_linkable("alice.0192", "W")  # and no keeper holds a link


def test_a_mount_point_below_a_directory_others_can_change_is_refused(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from minidisk.link.asuser import LocalUser  # (new with the fix)

    with user_writable_state(site) as state:
        monkeypatch.setenv("MINIDISK_STATE_DIR", str(state))
        with pytest.raises(linker.LinkError, match="can be changed or read by others"):
            linker.user_mount_point(LocalUser(USER, USER), "alice.0191")
        assert not (state / "vmlink").exists() or not list((state / "vmlink").iterdir())
