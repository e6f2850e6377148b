"""The size a kernel block device can give an export: whole logical blocks only.

A block device's capacity is counted in 512-byte sectors, and its I/O in logical blocks: the
kernel's nbd driver sets the capacity to bytes >> 9 and a loop device rounds its backing file
down to whole sectors, so an export of 1000 bytes would come online as 512 without a word,
and a 4096-byte-block export of 6144 bytes would end in half a block no I/O can reach. No
write past the last whole block can be made, so padding is not possible either: such an
export is refused, unless the caller says the tail may go (`--truncate`), which is then said
on stderr.
"""

from __future__ import annotations

import logging

from minidisk.kernel.errors import AttachError

log = logging.getLogger(__name__)


def whole_blocks(uri: object, size: int, block_size: int, truncate: bool) -> int:
    """`size` if it is a multiple of `block_size`; else, with `truncate`, the size cut to whole
    blocks (logged as a warning), without it an AttachError naming the export and the size."""
    tail = size % block_size
    if not tail:
        return size
    usable = size - tail
    if not truncate:
        raise AttachError(f"{uri}: the export's size {size} is not a multiple of its "
                          f"{block_size}-byte blocks: a block device would lose its last "
                          f"{tail} bytes; give --truncate to attach the first {usable}")
    log.warning("%s: size %d is not a multiple of %d: attached as %d bytes, the last %d "
                "unreachable (--truncate)", uri, size, block_size, usable, tail)
    return usable
