"""Helpers for the dm tests (imported by name: conftest.py puts this directory on sys.path)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import TypeVar

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


def memory_namespace(**sizes: int) -> DeviceDict:
    """`/dev/<name>` -> MemoryDevice of the given size, for each keyword."""
    return DeviceDict({f"/dev/{k}": MemoryDevice(v) for k, v in sizes.items()})


def registry_over(ns: DeviceDict) -> Registry:
    return Registry(ns, ns)
