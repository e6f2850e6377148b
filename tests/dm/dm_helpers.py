"""Helpers for the dm tests: run a coroutine, seeded data, memory namespaces, and a
`minidisk serve` with `minidisk dmsetup` against it."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests import harness
from tests.harness import MINIDISK

from minidisk.device.api import BlockDevice
from minidisk.device.memory import MemoryDevice
from minidisk.dm import DeviceDict, Registry

SECTOR = 512
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


async def until(condition: Callable[[], bool], passes: int = 10_000) -> None:
    """Let the loop run until `condition()` holds -- state the code shows (a device's queued
    count, say), not a sleep that hopes the other task got that far. Bounded in loop passes,
    not time: a loaded machine makes it no more likely to fail."""
    for _ in range(passes):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not reached in {passes} loop passes: {condition}")


async def idle_passes(passes: int = 200) -> None:
    """Let the loop run `passes` times round: what the loop alone would do (no thread, no
    timer) has then been done, so a test can assert that something did not happen -- a
    deferred removal of a device still in use, say -- without sleeping for a guessed time."""
    for _ in range(passes):
        await asyncio.sleep(0)


def memory_namespace(**sizes: int) -> DeviceDict:
    """`/dev/<name>` -> MemoryDevice of the given size, for each keyword."""
    return DeviceDict({f"/dev/{k}": MemoryDevice(v) for k, v in sizes.items()})


class HeldDevice(MemoryDevice):
    """A memory device whose writes wait until the test lets them go (`release`): I/O kept
    in flight as long as a test needs, with no timer. `held` counts the writes waiting."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = asyncio.Event()
        self.held = 0

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self.held += 1
        try:
            await self.release.wait()
        finally:
            self.held -= 1
        await super().pwrite(buf, offset, fua)


def registry_over(ns: DeviceDict) -> Registry:
    return Registry(ns, ns)


@dataclass(eq=False)
class Server(harness.Server):
    """A `minidisk serve -s` process on a private unix socket; its log (`log`) is where dm's
    reasons for refusals go."""

    @property
    def sock(self) -> Path:
        return Path(self.socket)

    def uri(self, key: str = "", scheme: str = "nbd+unix", query: str = "") -> str:
        """The NBD URI of the device at `key` (`/dev/mapper/NAME`: its slash begins the path)."""
        return super().uri(key.removeprefix("/"), scheme, query)

    def dmsetup(self, *args: str, check: bool = True, timeout: float = 60,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MINIDISK, "dmsetup", "--server", self.url, *args],
                              capture_output=True, text=True, check=check, timeout=timeout,
                              input=stdin)


def serve(directory: Path, *options: str, name: str = "s") -> Server:
    """`minidisk serve -s OPTIONS` on DIRECTORY/NAME.sock (harness.serve), as a Server that
    runs `minidisk dmsetup` against itself."""
    server = harness.serve(directory, *options, name=name)
    return Server(server.proc, server.log, server.socket)
