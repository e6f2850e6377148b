"""`dust <dev> <offset> <block_bytes>`: a bad-block emulator (DOC/dm-dust.rst).

Blocks are numbered on the underlying device (offset included), `block_bytes` each, as the
kernel's `dust_map` numbers them. The target starts in bypass mode: the list is kept but
nothing fails. After `enable`, a read touching a listed block fails with EIO, and a write
to a listed block either fails (while the block's write-fail count lasts) or succeeds and
takes the block off the list, as a drive remaps a sector on write. Requests are handled
block by block, as the kernel splits them (max_io_len = one block).

Messages: addbadblock N [write_fail_count], removebadblock N, queryblock N,
countbadblocks, clearbadblocks, listbadblocks, enable, disable, quiet.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import replace

from minidisk.dm.status import DustStatus
from minidisk.dm.status_table import DustTable
from minidisk.dm.table import SECTOR
from minidisk.dm.target import TargetContext, TargetError, WindowTarget, parse_uint


def _bad_block() -> OSError:
    return OSError(errno.EIO, "read of a bad block")


class Dust(WindowTarget):
    name = "dust"
    version = (1, 0, 0)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) != 3:
            raise TargetError("Invalid argument count: expected <dev> <offset> <blksz>")
        self.block_bytes = parse_uint(args[2], "Invalid block size parameter", 2**32 - 1)
        if self.block_bytes < SECTOR:
            raise TargetError("Invalid block size parameter -- please enter 512 or above")
        if self.block_bytes & (self.block_bytes - 1):
            raise TargetError("Invalid block size parameter -- please enter a power of 2")
        self.open_window(ctx, args[0], args[1], "Invalid device offset sector")
        # No extents: a server skips reading holes, and every read here must reach this
        # target (to fail).
        self.caps = replace(self.caps, extents=False)
        self.bad: dict[int, int] = {}  # block -> writes that must still fail
        self.fail_reads = False
        self.quiet = False

    def status_table(self) -> DustTable:
        return DustTable(self.ref.key, self.start, self.block_bytes)

    def status_info(self) -> DustStatus:
        return DustStatus(self.ref.key, self.fail_reads, self.quiet)

    def _blocks(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(block, position in request, bytes) for each device block the request touches."""
        pos, size = 0, self.block_bytes
        while pos < length:
            block, inside = divmod(self.base + offset + pos, size)
            n = min(size - inside, length - pos)
            yield block, pos, n
            pos += n

    def _check_read(self, offset: int, length: int) -> None:
        if self.fail_reads and self.bad:
            for block, _, _ in self._blocks(offset, length):
                if block in self.bad:
                    raise _bad_block()

    def _write_fails(self, block: int) -> bool:
        """Apply a write to `block` to the list; True if the write must fail."""
        if not self.fail_reads or block not in self.bad:
            return False
        if self.bad[block] > 0:
            self.bad[block] -= 1
            return True
        del self.bad[block]
        return False

    async def pread(self, buf: memoryview, offset: int) -> None:
        self._check_read(offset, len(buf))
        await self.child.pread(buf, offset + self.base)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if not (self.fail_reads and self.bad):
            await self.child.pwrite(buf, offset + self.base, fua)
            return
        failed = False
        for block, pos, n in self._blocks(offset, len(buf)):
            if self._write_fails(block):
                failed = True
                continue
            await self.child.pwrite(buf[pos:pos + n], offset + self.base + pos, fua)
        if failed:
            raise OSError(errno.EIO, "write to a bad block")

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        # A zeroing write remaps bad blocks just like a data write.
        for block, _, _ in self._blocks(offset, length):
            if self._write_fails(block):
                raise OSError(errno.EIO, "write to a bad block")
        await self.child.zero(offset + self.base, length, may_trim, fast, fua)

    # Messages, with the kernel's result strings (dust_message).

    async def message(self, args: list[str]) -> str | None:
        verb = args[0].lower() if args else ""
        if len(args) == 1:
            return self._message1(verb)
        if len(args) in (2, 3) and verb in ("addbadblock", "removebadblock", "queryblock"):
            block = self._block_arg(args[1])
            if verb == "addbadblock":
                count = 0
                if len(args) == 3:
                    if not args[2].isdigit() or int(args[2]) > 255:
                        raise OSError(errno.EINVAL, "selected write fail count out of range")
                    count = int(args[2])
                if block in self.bad:
                    raise OSError(errno.EINVAL,
                                  f"dust_add_block: block {block} already in badblocklist")
                self.bad[block] = count
                return None
            if len(args) == 3:
                raise OSError(errno.EINVAL, f"unrecognized message '{args[0]}' received")
            if verb == "removebadblock":
                if self.bad.pop(block, None) is None:
                    raise OSError(errno.EINVAL,
                                  f"dust_remove_block: block {block} not found in badblocklist")
                return None
            found = "found" if block in self.bad else "not found"
            return f"dust_query_block: block {block} {found} in badblocklist"
        if not args or len(args) > 3:
            raise OSError(errno.EINVAL, f"invalid number of arguments '{len(args)}'")
        raise OSError(errno.EINVAL, f"unrecognized message '{args[0]}' received")

    def _message1(self, verb: str) -> str | None:
        if verb in ("addbadblock", "removebadblock", "queryblock"):
            raise OSError(errno.EINVAL, f"{verb} requires an additional argument")
        if verb in ("enable", "disable"):
            self.fail_reads = verb == "enable"
            return None
        if verb == "quiet":
            self.quiet = not self.quiet
            return None
        if verb == "countbadblocks":
            return f"countbadblocks: {len(self.bad)} badblock(s) found"
        if verb == "clearbadblocks":
            if not self.bad:
                return "dust_clear_badblocks: no badblocks found"
            self.bad.clear()
            return "dust_clear_badblocks: badblocks cleared"
        if verb == "listbadblocks":
            if not self.bad:
                return "No blocks in badblocklist"
            return "\n".join(str(b) for b in sorted(self.bad))
        raise OSError(errno.EINVAL, f"unrecognized message '{verb}' received")

    def _block_arg(self, word: str) -> int:
        if not word.isdigit():
            raise OSError(errno.EINVAL, f"invalid block number {word!r}")
        block = int(word)
        if block > self.child.size // self.block_bytes:
            raise OSError(errno.EINVAL, "selected block value out of range")
        return block
