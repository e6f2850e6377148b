"""Device-mapper in userspace: tables of targets that make devices out of devices.

A `Registry` holds the mapped devices of one server and implements the dmsetup lifecycle;
each `MappedDevice` is a `BlockDevice` with a live and an inactive table. Targets live one
per module in `minidisk.dm.targets`. This package never imports the NBD server.
"""

from minidisk.dm.devices import DeviceDict, DeviceSource, Publisher
from minidisk.dm.mapped import DeviceInfo, MappedDevice
from minidisk.dm.registry import Registry
from minidisk.dm.table import TableError

__all__ = [
    "DeviceDict",
    "DeviceInfo",
    "DeviceSource",
    "MappedDevice",
    "Publisher",
    "Registry",
    "TableError",
]
