"""Helpers for the dm tests (imported by name: conftest.py puts this directory on sys.path)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from minidisk.device.api import BlockDevice
from minidisk.device.memory import MemoryDevice
from minidisk.dm import DeviceDict, Registry

SECTOR = 512
MINIDISK = str(Path(sys.executable).parent / "minidisk")
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


async def read(dev: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await dev.pread(memoryview(buf), offset)
    return bytes(buf)


async def write(dev: BlockDevice, offset: int, data: bytes, fua: bool = False) -> None:
    await dev.pwrite(memoryview(bytearray(data)), offset, fua)


def memory_namespace(**sizes: int) -> DeviceDict:
    """`/dev/<name>` -> MemoryDevice of the given size, for each keyword."""
    return DeviceDict({f"/dev/{k}": MemoryDevice(v) for k, v in sizes.items()})


def registry_over(ns: DeviceDict) -> Registry:
    return Registry(ns, ns)


class Server:
    """A `minidisk serve -s` process on a private unix socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: Path, log: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.log = log  # its output: the log, where dm's reasons for refusals go
        self.url = f"unix://{sock}"

    def uri(self, key: str) -> str:
        return f"nbd+unix://{key}?socket={self.sock}"

    def dmsetup(self, *args: str, check: bool = True, timeout: float = 60,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MINIDISK, "dmsetup", "--server", self.url, *args],
                              capture_output=True, text=True, check=check, timeout=timeout,
                              input=stdin)
