"""The control client's and the link layer's errors are OSErrors carrying an errno (so that a
caller catching OSError catches them, and `errno`/`strerror` say what failed), while the
CLI still prints them as one line: the message alone."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from minidisk import control_client
from minidisk.control_client import ControlError
from minidisk.link import linker


def _minidisk(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MINIDISK_STATE_DIR": str(state)}
    return subprocess.run([sys.executable, "-m", "minidisk", *args], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def test_control_error_is_an_oserror(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/nobody.sock"
    with pytest.raises(OSError) as caught:  # no server there
        control_client.call(url, "etfs.ls", timeout=10)
    error = caught.value
    assert isinstance(error, ControlError)
    assert (error.errno, error.strerror) == (
        errno.ENOENT, f"cannot connect to {url}: No such file or directory")
    assert str(error) == error.strerror
    done = _minidisk("etfs", "ls", "--server", url, state=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"minidisk: {error.strerror}\n"


def test_link_error_is_an_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIDISK_STATE_DIR", str(tmp_path))
    with pytest.raises(OSError) as caught:
        linker.unlink("nobody.0001")
    error = caught.value
    assert isinstance(error, linker.LinkError)
    message = f"nobody.0001: not linked here (no state in {tmp_path / 'link'})"
    assert (error.errno, error.strerror, str(error)) == (errno.ENOENT, message, message)
    done = _minidisk("unlink", "nobody.0001", state=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"minidisk: {message}\n")


def test_refusals_keep_the_errno_a_helper_answered() -> None:
    """The keeper and a resolve run as another user answer in JSON; a missing or forged
    errno is EIO, never 0 (an OSError with errno 0 would say "Success")."""
    answers: list[tuple[dict[str, Any], int]] = [
        ({"errno": errno.EACCES, "error": "no"}, errno.EACCES), ({"error": "no"}, errno.EIO),
        ({"errno": "13", "error": "no"}, errno.EIO), ({"errno": 0, "error": "no"}, errno.EIO)]
    for answer, err in answers:
        refused = linker._refused(answer)
        assert (refused.errno, str(refused)) == (err, "no")
