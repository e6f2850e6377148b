"""libo2dlm's face on a `DlmClient`: a context per domain, PR/EX locks by id, the value
block, drop and destroy (`markfasheh/ocfs2-tools: include/o2dlm/o2dlm.h`), with its error
names as `DlmError` subclasses::

    ctx = await dlm.initialize("domain")
    await ctx.lock("id", Mode.EX, trylock=True)       # TrylockFailed (ETXTBSY) if busy
    await ctx.write_lvb("id", b"data"); await ctx.unlock("id")
    await ctx.read_lvb("id")                          # LvbInvalid when invalid
    await ctx.drop("id"); await ctx.destroy()
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from minidisk.dlm.engine import DlmError
from minidisk.dlm.lock import Lock
from minidisk.dlm.modes import Mode

if TYPE_CHECKING:
    from minidisk.dlm.client import DlmClient


class TrylockFailed(DlmError):
    def __init__(self, lock_id: str) -> None:
        super().__init__(errno.ETXTBSY, f"{lock_id!r} is busy")


class RecursiveLock(DlmError):
    def __init__(self, lock_id: str) -> None:
        super().__init__(errno.EDEADLK, f"{lock_id!r} is already locked by this context")


class LvbInvalid(DlmError):
    def __init__(self, lock_id: str) -> None:
        super().__init__(errno.ENODATA, f"the value block of {lock_id!r} is invalid")


class BusyLock(DlmError):
    def __init__(self, lock_id: str) -> None:
        super().__init__(errno.EBUSY, f"{lock_id!r} is in use")


class O2dlmDomain:
    """libo2dlm's context for one domain: PR/EX locks by id, the value block, drop, destroy.

    Errors follow libo2dlm's: TrylockFailed (O2DLM_ET_TRYLOCK_FAILED), RecursiveLock,
    LvbInvalid, BusyLock (O2DLM_ET_BUSY_LOCK); ids are < 32 bytes and must not start with
    "." (reserved). Membership of the domain, not libo2dlm's private ".%016x" PR lock, is what
    keeps the domain alive while the context is in use.
    """

    def __init__(self, client: DlmClient, domain: str) -> None:
        self.client = client
        self.domain = domain
        self._locks: dict[str, Lock] = {}

    def _check(self, lock_id: str) -> None:
        raw = lock_id.encode()
        if not raw or len(raw) >= 32 or lock_id.startswith("."):
            raise DlmError(errno.EINVAL, f"bad lock id {lock_id!r}")

    def _held(self, lock_id: str) -> Lock:
        lock = self._locks.get(lock_id)
        if lock is None:
            raise DlmError(errno.ENOENT, f"{lock_id!r} is not locked by this context")
        return lock

    async def lock(self, lock_id: str, level: Mode | str, trylock: bool = False) -> None:
        self._check(lock_id)
        mode = Mode.parse(level)
        if mode not in (Mode.PR, Mode.EX):
            raise DlmError(errno.EINVAL, "libo2dlm levels are PR and EX")
        if lock_id in self._locks:
            raise RecursiveLock(lock_id)
        lock = self.client.lock(self.domain, lock_id, mode)
        if not await lock.acquire(blocking=not trylock):
            raise TrylockFailed(lock_id)
        self._locks[lock_id] = lock

    async def unlock(self, lock_id: str) -> None:
        await self._held(lock_id).release()
        del self._locks[lock_id]

    async def read_lvb(self, lock_id: str) -> bytes:
        lock = self._held(lock_id)
        if not lock.lvb_valid:
            raise LvbInvalid(lock_id)
        return lock.lvb

    async def write_lvb(self, lock_id: str, data: bytes) -> int:
        return self._held(lock_id).write_lvb(data)

    async def drop(self, lock_id: str) -> None:
        self._check(lock_id)
        if lock_id in self._locks:
            raise BusyLock(lock_id)
        try:
            await self.client.drop(self.domain, lock_id)
        except DlmError as err:
            if err.errno == errno.EBUSY:
                raise BusyLock(lock_id) from None
            if err.errno != errno.ENOENT:
                raise

    async def destroy(self) -> None:
        """Unlock everything, drop every resource this context locked, leave the domain."""
        for lock_id in list(self._locks):
            await self.unlock(lock_id)
            await self.drop(lock_id)
        await self.client.leave(self.domain)
