"""Fixtures shared by every test area (each area keeps its own in tests/<area>/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MINIDISK = str(VENV_BIN / "minidisk")
SYSTEM_PYTHON = "/usr/bin/python3"  # the only interpreter with libnbd's `nbd` module
# Every bound a test waits for is multiplied by this: 1 here; a TCG guest, where Python runs
# ~20x slower, sets MINIDISK_TEST_TIME_SCALE (tests/vm/test_autofs_guest.py).
TIME_SCALE = float(os.environ.get("MINIDISK_TEST_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
    """A wait bound of `seconds` on this machine, as long as it must be where tests run."""
    return seconds * TIME_SCALE


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a process a test started, wait up to `timeout` for it, then SIGKILL it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def minidisk_cmd() -> str:
    return MINIDISK


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory for unix sockets (sun_path is limited to 107 bytes)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="md-", dir="/tmp"))
    yield d  # type: ignore[misc]
    shutil.rmtree(d, ignore_errors=True)


def kernel_has_autofs() -> bool:
    """Whether this kernel mounts autofs: built in, or its module loads."""
    def listed() -> bool:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["autofs"] for line in f)

    if listed():
        return True
    subprocess.run(["modprobe", "-q", "autofs4"], capture_output=True)
    return listed()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every autofs test runs once: here if this kernel has autofs, else in a guest.

    Machines of this kind may boot a kernel without autofs; tests/vm/test_autofs_guest.py then
    runs the `autofs` tests under Debian's kernel, and is itself deselected where they can run
    here.
    """
    if TIME_SCALE != 1:  # pytest-timeout takes the closest marker: put the scaled one first
        for item in items:
            marker = item.get_closest_marker("timeout")
            seconds = marker.args[0] if marker is not None and marker.args else None
            seconds = seconds if seconds is not None else config.getini("timeout")
            item.add_marker(pytest.mark.timeout(scaled(float(seconds))), append=False)
    unwanted = "autofs_guest" if kernel_has_autofs() else "autofs"
    dropped = [item for item in items if item.get_closest_marker(unwanted) is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.get_closest_marker(unwanted) is None]


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Guest modules whole and first (guest_scheduling.py says why); other --dist modes are
    xdist's own."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from tests.guest_scheduling import GuestUnits

    return GuestUnits(config, log)
