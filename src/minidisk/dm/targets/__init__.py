"""The target types a table may name, one module each."""

from __future__ import annotations

from minidisk.dm.target import Target
from minidisk.dm.targets.delay import Delay
from minidisk.dm.targets.dust import Dust
from minidisk.dm.targets.error import Error
from minidisk.dm.targets.flakey import Flakey
from minidisk.dm.targets.linear import Linear
from minidisk.dm.targets.log_writes import LogWrites
from minidisk.dm.targets.striped import Striped
from minidisk.dm.targets.zero import Zero

TARGET_TYPES: dict[str, type[Target]] = {
    t.name: t for t in (Linear, Striped, Zero, Error, Delay, Flakey, Dust, LogWrites)
}

__all__ = ["TARGET_TYPES"]
