"""`zero`: reads return zeroes, writes are accepted and dropped (DOC/zero.rst)."""

from __future__ import annotations

from minidisk.device.null import NullDevice
from minidisk.dm.target import Target, TargetContext, TargetError


class Zero(NullDevice, Target):
    """The kernel's zero target is exactly the null device: its I/O methods and caps come
    from NullDevice (first in the MRO), its table life from Target."""

    name = "zero"
    version = (1, 1, 0)  # 6.1's

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        Target.__init__(self, ctx, args)
        if args:
            raise TargetError("No arguments required")
