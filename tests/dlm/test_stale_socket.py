"""The lock manager takes over only a dead socket at its path: never a file or a symlink."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from minidisk.dlm.service import start_dlm_service


def _start(path: Path) -> None:
    async def go() -> None:
        service = await start_dlm_service(f"unix://{path}")
        await service.close()
    asyncio.run(go())


def test_a_regular_file_at_the_socket_path_is_kept(short_tmp: Path) -> None:
    sock = short_tmp / "dlm.sock"
    sock.write_text("precious")
    with pytest.raises(OSError, match="exists and is not a socket"):
        _start(sock)
    assert sock.read_text() == "precious"


def test_a_symlink_to_a_stale_socket_is_not_followed(short_tmp: Path) -> None:
    # Before: os.stat followed the link to a dead socket, so the service removed the link and
    # listened in its place (DID NOT RAISE).
    import socket as socketlib

    target = short_tmp / "elsewhere.sock"
    dead = socketlib.socket(socketlib.AF_UNIX)
    dead.bind(str(target))
    dead.close()
    link = short_tmp / "dlm.sock"
    link.symlink_to(target)
    with pytest.raises(OSError, match="exists and is not a socket"):
        _start(link)
    assert link.is_symlink() and target.exists()
