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
