"""What the dm layer needs from the namespace, as two small protocols.

Tables name devices by namespace key (`/dev/dk`). The registry resolves `/dev/mapper/NAME`
itself and asks a `DeviceSource` for every other key: `lookup` finds the device, `hold`
returns a counted reference that the table keeps until it is destroyed (so the namespace
refuses to remove a device a table maps). Each mapped device is published back under
`/dev/mapper/NAME` through a `Publisher`, so the server exports it like any other device;
the publisher counts the NBD clients of each key (`users`, part of a device's open count)
and says when the last one goes (`on_unused`, which ends a deferred removal's wait).

`minidisk.namespace.Namespace` is both. `DeviceDict` is both over a plain dict: enough for
tests, and for embedding dm without a namespace.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Protocol

from minidisk.device.api import BlockDevice

MAPPER_PREFIX = "/dev/mapper/"
DICT_MAJOR = 240  # as the namespace's KEY_MAJOR


class Held(Protocol):
    def release(self) -> None: ...


class DeviceSource(Protocol):
    def lookup(self, key: str) -> BlockDevice:
        """The device at `key`; OSError(ENOENT) (or KeyError) if there is none."""
        ...

    def hold(self, key: str) -> Held: ...

    def devno(self, key: str) -> tuple[int, int] | None:
        """The key's device number, which tables print for it (None: print the key)."""
        ...

    def key_of_devno(self, major: int, minor: int) -> str:
        """The key a table's MAJOR:MINOR names; OSError(ENOENT) if none."""
        ...


class Publisher(Protocol):
    def register_device(self, key: str, device: BlockDevice,
                        description: str | None = None) -> str: ...

    async def remove(self, key: str, force: bool = False) -> None:
        """Take `key` out; EBUSY if clients still use it (unless `force`)."""
        ...

    def users(self, key: str) -> int:
        """References to `key` now (NBD connections, tables)."""
        ...

    def rekey(self, key: str, new_key: str, description: str | None = None) -> str:
        """Move `key`'s device to `new_key` without closing it; EBUSY while in use."""
        ...

    def on_unused(self, listener: Callable[[str], None]) -> None:
        """Call `listener(key)` whenever the last reference to a key is let go."""
        ...


class _DictHold:
    def __init__(self, owner: DeviceDict, key: str) -> None:
        self._owner: DeviceDict | None = owner
        self._key = key
        owner.holds[key] = owner.holds.get(key, 0) + 1

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.holds[self._key] -= 1
            if not owner.holds[self._key]:
                del owner.holds[self._key]
                for listener in owner.unused_listeners:
                    listener(self._key)


class DeviceDict:
    """A namespace that is a dict of key -> device, with hold counts."""

    def __init__(self, devices: dict[str, BlockDevice] | None = None) -> None:
        self.devices: dict[str, BlockDevice] = dict(devices or {})
        self.holds: dict[str, int] = {}
        self.unused_listeners: list[Callable[[str], None]] = []

    def lookup(self, key: str) -> BlockDevice:
        try:
            return self.devices[key]
        except KeyError:
            raise OSError(errno.ENOENT, f"key {key} is not registered") from None

    def hold(self, key: str) -> Held:
        self.lookup(key)
        return _DictHold(self, key)

    def users(self, key: str) -> int:
        return self.holds.get(key, 0)

    def devno(self, key: str) -> tuple[int, int] | None:
        """(DICT_MAJOR, position of the key among the devices): enough for tests."""
        keys = [k for k in self.devices if not k.startswith(MAPPER_PREFIX)]
        return (DICT_MAJOR, keys.index(key)) if key in keys else None

    def key_of_devno(self, major: int, minor: int) -> str:
        keys = [k for k in self.devices if not k.startswith(MAPPER_PREFIX)]
        if major != DICT_MAJOR or minor >= len(keys):
            raise OSError(errno.ENOENT, f"no key has device number {major}:{minor}")
        return keys[minor]

    def on_unused(self, listener: Callable[[str], None]) -> None:
        self.unused_listeners.append(listener)

    def register_device(self, key: str, device: BlockDevice,
                        description: str | None = None) -> str:
        if key in self.devices:
            raise OSError(errno.EEXIST, f"key {key} is already registered")
        self.devices[key] = device
        return key

    def rekey(self, key: str, new_key: str, description: str | None = None) -> str:
        if key not in self.devices:
            raise OSError(errno.ENOENT, f"key {key} is not registered")
        if self.holds.get(key):
            raise OSError(errno.EBUSY, f"key {key} is in use ({self.holds[key]} references)")
        if new_key in self.devices:
            raise OSError(errno.EEXIST, f"key {new_key} is already registered")
        self.devices[new_key] = self.devices.pop(key)
        return new_key

    async def remove(self, key: str, force: bool = False) -> None:
        if key not in self.devices:
            raise OSError(errno.ENOENT, f"key {key} is not registered")
        if self.holds.get(key) and not force:
            raise OSError(errno.EBUSY, f"key {key} is in use ({self.holds[key]} references)")
        del self.devices[key]
