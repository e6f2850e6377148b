"""The names of the dm commands on the server's control channel, one spelling for both ends:
dm/control.py serves them, cli/dmsetup sends them. A leaf module (it imports nothing), so
that the client side does not load the dm layer to name a command."""

from __future__ import annotations

from enum import StrEnum


class DmCommand(StrEnum):
    """One per ioctl-like operation; the value is what goes over the wire."""

    CREATE = "dm.create"
    LOAD = "dm.load"
    RELOAD = "dm.reload"
    SUSPEND = "dm.suspend"
    RESUME = "dm.resume"
    CLEAR = "dm.clear"
    REMOVE = "dm.remove"
    REMOVE_ALL = "dm.remove_all"
    RENAME = "dm.rename"
    INFO = "dm.info"
    LS = "dm.ls"
    DEPS = "dm.deps"
    TABLE = "dm.table"
    STATUS = "dm.status"
    MEASURE = "dm.measure"
    WAIT = "dm.wait"
    MESSAGE = "dm.message"
    TARGETS = "dm.targets"
    READAHEAD = "dm.readahead"
    GEOMETRY = "dm.geometry"
    VERSION = "dm.version"
