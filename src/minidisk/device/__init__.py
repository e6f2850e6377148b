"""Block devices: the one interface every backend, target and server speaks."""

from minidisk.device.adapter import from_object
from minidisk.device.api import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    BlockDevice,
    BlockSize,
    Caps,
    Extent,
    check_range,
)

__all__ = [
    "EXTENT_HOLE",
    "EXTENT_ZERO",
    "BlockDevice",
    "BlockSize",
    "Caps",
    "Extent",
    "check_range",
    "from_object",
]
