"""The listening side under attack: what `serve unix://PATH` may remove, how many clients it
takes and for how long, and how it notices a peer whose host vanished (issue 10, items 5,
6 and 8).

Servers run as `minidisk serve -s` subprocesses (tests/nbd/conftest.py); where a real
client matters, libnbd runs under /usr/bin/python3.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from minidisk.nbd.listen import ListenAddress, bind

MINIDISK_TIMEOUT = 15.0


# -- item 6: only a socket nobody listens on is stale ---------------------------------------


def _serve_once(minidisk_cmd: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([minidisk_cmd, "serve", "-s", "--memory", "disk=1M", url],
                          capture_output=True, text=True, timeout=MINIDISK_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def test_serve_refuses_to_replace_a_regular_file(minidisk_cmd: str, short_tmp: Path) -> None:
    victim = short_tmp / "precious"
    victim.write_bytes(b"keep me")
    proc = _serve_once(minidisk_cmd, f"unix://{victim}")
    assert proc.returncode != 0
    assert str(victim) in proc.stderr and "not a socket" in proc.stderr, proc.stderr
    assert victim.read_bytes() == b"keep me"


def test_bind_does_not_follow_or_remove_a_symlink(short_tmp: Path) -> None:
    # A symlink to a socket nobody listens on: connect() would follow it and find the
    # target stale; the link must still not be taken for a socket (lstat).
    target = short_tmp / "dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(target))
    dead.close()
    link = short_tmp / "link.sock"
    link.symlink_to(target)
    with pytest.raises(OSError, match="not a socket") as info:
        bind(ListenAddress("unix", path=str(link)))
    assert str(link) in str(info.value)
    assert link.is_symlink() and target.exists()


def test_bind_refuses_a_live_socket(short_tmp: Path) -> None:
    path = short_tmp / "live.sock"
    live = bind(ListenAddress("unix", path=str(path)))
    try:
        with pytest.raises(OSError, match="in use") as info:
            bind(ListenAddress("unix", path=str(path)))
        assert str(path) in str(info.value)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))  # still the first listener's
        probe.close()
    finally:
        live.close()


def test_bind_replaces_a_stale_socket(short_tmp: Path) -> None:
    path = short_tmp / "stale.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()  # the name stays, nobody listens: what a crash leaves behind
    sock = bind(ListenAddress("unix", path=str(path)))
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        probe.close()
    finally:
        sock.close()
        os.unlink(path)
