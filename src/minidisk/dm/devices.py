"""What the dm layer needs from the namespace, as a small protocol.

Tables name devices by namespace key (`/dev/dk`). The registry resolves `/dev/mapper/NAME`
itself and asks a `DeviceSource` for every other key: `lookup` to find the device, `hold`
and `release` around the time a table uses it (so the namespace can refuse to remove a
device a table holds). It publishes each mapped device back under `/dev/mapper/NAME`
through a `Publisher`, so the server exports it like any other device.

`DeviceDict` implements both over a plain dict: enough for tests, and for embedding dm
without a namespace.
"""

from __future__ import annotations

import errno
from typing import Protocol

from minidisk.device.api import BlockDevice

MAPPER_PREFIX = "/dev/mapper/"


class DeviceSource(Protocol):
    def lookup(self, key: str) -> BlockDevice:
        """The device at `key`; raise KeyError or OSError(ENOENT/ENXIO) if there is none."""
        ...

    def hold(self, key: str) -> None: ...

    def release(self, key: str) -> None: ...


class Publisher(Protocol):
    def register(self, key: str, device: BlockDevice) -> None: ...

    def unregister(self, key: str) -> None: ...


class DeviceDict:
    """A namespace that is a dict of key -> device, with hold counts."""

    def __init__(self, devices: dict[str, BlockDevice] | None = None) -> None:
        self.devices: dict[str, BlockDevice] = dict(devices or {})
        self.holds: dict[str, int] = {}

    def lookup(self, key: str) -> BlockDevice:
        try:
            return self.devices[key]
        except KeyError:
            raise OSError(errno.ENOENT, f"no device {key}") from None

    def hold(self, key: str) -> None:
        self.holds[key] = self.holds.get(key, 0) + 1

    def release(self, key: str) -> None:
        left = self.holds[key] - 1
        if left:
            self.holds[key] = left
        else:
            del self.holds[key]

    def register(self, key: str, device: BlockDevice) -> None:
        if key in self.devices:
            raise OSError(errno.EEXIST, f"{key} exists")
        self.devices[key] = device

    def unregister(self, key: str) -> None:
        if self.holds.get(key):
            raise OSError(errno.EBUSY, f"{key} is in use")
        self.devices.pop(key, None)
