"""The dlmfs `pyfuse3.Operations`: a two-level tree (domains, then lock files) kept locally,
the mount being one node: one cached lock per lock file, held for the open file descriptions
of this mount (see `Resource`). Semantics: see the package docstring."""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import select
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio
from pyfuse3 import FUSEError

from minidisk.dlm.client import DlmClient
from minidisk.dlm.engine import DlmError
from minidisk.dlm.lock import Lock
from minidisk.dlm.modes import Mode, compatible
from minidisk.dlm.state import LVB_LEN, Flag
from minidisk.dlmfs.signals import Requester

log = logging.getLogger("minidisk.dlmfs")

DOMAIN_NAME_LIMIT = 64  # GROUP_NAME_MAX: a domain name must be shorter
LOCK_NAME_LIMIT = 32    # DLM_LOCKID_NAME_MAX in dlmfs: a lock name must be shorter
NAME_MAX = 255          # what the VFS allows at all (ENAMETOOLONG past it, before any rule)
# o2dlm's DLM_PURGE_INTERVAL_MS: an unused resource (value block included) is kept this long
# after its lock file is unlinked, so that one made again at once finds its value block.
PURGE_DELAY = 8.0
ROOT = pyfuse3.ROOT_INODE


@dataclass(eq=False)
class Node:
    ino: int
    name: str
    parent: int
    mode: int  # st_mode, type bits included
    uid: int
    gid: int
    children: dict[str, int] = field(default_factory=dict)
    res: Resource = field(default_factory=lambda: Resource())  # lock files only
    lookups: int = 0
    unlinked: bool = False
    times_ns: list[int] = field(default_factory=lambda: [time.time_ns()] * 3)  # a, m, c

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Resource:
    """The mount's one lock on a lock file, as userdlm.c's lockres: this node's cached level,
    the local holders of each mode, and whether another node waits for it.

    A local open at or below the cached level is granted from it with no lock-manager call; a
    higher level is one conversion. A close only counts a holder out: the lock stays cached
    at its level until another node asks for it (a blocking notification), and then gives
    way as soon as no local holder conflicts -- EX falls to nothing when the other node wants
    EX, to PR when it wants PR. While it is asked for, new local opens that conflict with the
    level it is falling to wait, so that a busy node cannot starve the other."""

    def __init__(self) -> None:
        self.lock: Lock | None = None
        self.holders = {Mode.PR: 0, Mode.EX: 0}
        self.busy = False  # a request or conversion of `lock` is in flight
        self.blocked: Mode | None = None  # what another node waits for
        self.unblocking = False  # a task is giving the lock way
        self.handles: set[int] = set()
        self._changed = trio.Event()

    @property
    def level(self) -> Mode | None:
        lock = self.lock
        return lock.mode if lock is not None and not lock.lost else None

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> None:
        await self._changed.wait()

    def conflicts_locally(self, level: Mode) -> bool:
        """Whether a local holder excludes `level` (only with --exclusive)."""
        return self.holders[Mode.EX] > 0 or (level is Mode.EX and self.holders[Mode.PR] > 0)

    def may_give_way(self) -> bool:
        assert self.blocked is not None
        if self.busy or self.holders[Mode.EX]:
            return False
        return not (self.holders[Mode.PR] and not compatible(Mode.PR, self.blocked))


def highest_compatible(mode: Mode) -> Mode:
    """The highest level a lock can keep beside a request for `mode` (NL for EX)."""
    return max(m for m in Mode if compatible(m, mode))


@dataclass(eq=False)
class Handle:
    fh: int
    node: Node
    level: Mode  # PR (read-only open) or EX
    append: bool  # opened O_APPEND: dlmfs clears it, so writes follow `position`
    position: int = 0
    poll_handle: pyfuse3.PollHandle | None = None

    def wake_pollers(self) -> None:
        if self.poll_handle is not None:
            self.poll_handle.notify()
            self.poll_handle = None


def _fuse_error(err: DlmError) -> FUSEError:
    return FUSEError(err.errno or errno.EIO)


class DlmFs(pyfuse3.Operations):
    """Lock files over one lock manager connection (`client`): one node.

    `nursery` runs the tasks that give cached locks way to other nodes; `wait_limit` bounds
    a blocking open (None: it waits until granted, as dlmfs does); `exclusive` makes local
    holders exclude each other too (our extension)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, client: DlmClient, nursery: trio.Nursery, *,
                 wait_limit: float | None = None, exclusive: bool = False) -> None:
        super().__init__()
        self.client = client
        self.nursery = nursery
        self.wait_limit = wait_limit
        self.exclusive = exclusive
        self.nodes: dict[int, Node] = {
            ROOT: Node(ROOT, "", ROOT, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
        }
        self.handles: dict[int, Handle] = {}
        self._purges: dict[tuple[str, str], trio.CancelScope] = {}  # unlinked, not yet dropped
        self._inos = itertools.count(ROOT + 1)
        self._fhs = itertools.count(1)

    # -- attributes and names ---------------------------------------------------------------

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.InodeT(node.ino)
        attrs.st_mode = pyfuse3.ModeT(node.mode)
        attrs.st_nlink = 2 + sum(self.nodes[c].is_dir for c in node.children.values()) \
            if node.is_dir else 1
        attrs.st_uid, attrs.st_gid = node.uid, node.gid
        attrs.st_size = 0 if node.is_dir else LVB_LEN
        attrs.st_blksize = 4096  # dlmfs's s_blocksize: PAGE_SIZE
        attrs.st_blocks = 0
        attrs.st_atime_ns, attrs.st_mtime_ns, attrs.st_ctime_ns = node.times_ns
        # The tree changes only through this mount, so the kernel may cache names and
        # attributes; a short timeout still bounds any surprise.
        attrs.entry_timeout = attrs.attr_timeout = 1.0
        return attrs

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> Node:
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        ino = self._node(parent).children.get(os.fsdecode(name))
        if ino is None:
            raise FUSEError(errno.ENOENT)
        return self.nodes[ino]

    def _add(self, parent: Node, name: str, mode: int, ctx: pyfuse3.RequestContext) -> Node:
        node = Node(next(self._inos), name, parent.ino, mode, ctx.uid, ctx.gid)
        self.nodes[node.ino] = node
        parent.children[name] = node.ino
        parent.times_ns[1] = parent.times_ns[2] = time.time_ns()
        return node

    def _remove(self, parent: Node, node: Node) -> None:
        del parent.children[node.name]
        parent.times_ns[1] = parent.times_ns[2] = time.time_ns()
        node.unlinked = True
        if node.lookups == 0:
            del self.nodes[node.ino]

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._attrs(node)

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._looked_up(self._child(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0 and node.unlinked:
                del self.nodes[ino]

    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.times_ns[0] = attr.st_atime_ns
        if fields.update_mtime:
            node.times_ns[1] = attr.st_mtime_ns
        # update_size (truncate, O_TRUNC) is ignored: a lock file is always 64 bytes.
        node.times_ns[2] = time.time_ns()
        return self._attrs(node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 512
        data.f_files = len(self.nodes)
        data.f_namemax = NAME_MAX
        return data

    # -- domains ------------------------------------------------------------------------------

    async def mkdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise FUSEError(errno.EPERM)  # a domain directory has no mkdir
        if len(name) >= DOMAIN_NAME_LIMIT:
            raise FUSEError(errno.EINVAL)
        root = self.nodes[ROOT]
        domain = os.fsdecode(name)
        if domain in root.children:
            raise FUSEError(errno.EEXIST)
        try:
            await self.client.join(domain)
        except DlmError as err:
            raise _fuse_error(err) from None
        if domain in root.children:  # another mkdir won while we waited
            raise FUSEError(errno.EEXIST)
        node = self._add(root, domain, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx)
        return self._looked_up(node)

    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        node = self._child(parent_inode, name)
        if node.children:
            raise FUSEError(errno.ENOTEMPTY)
        self._remove(self.nodes[parent_inode], node)
        try:
            await self.client.leave(node.name)
        except DlmError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTCONN):
                raise _fuse_error(err) from None

    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not self._node(inode).is_dir:
            raise FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        # Offsets: 1 after ".", 2 after "..", ino + 2 after a child (inodes only grow, so a
        # listing resumed after changes neither repeats nor skips a name that stayed).
        directory = self._node(fh)
        dots = [(b".", directory, 1), (b"..", self._node(directory.parent), 2)]
        for dot, node, offset in dots:
            if offset > start_id and not pyfuse3.readdir_reply(token, dot, self._attrs(node),
                                                                offset):
                return
        for name, ino in sorted(directory.children.items(), key=lambda item: item[1]):
            if ino + 2 <= start_id:
                continue
            node = self.nodes[ino]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), ino + 2):
                return
            node.lookups += 1  # the kernel counts a lookup for each entry but "." and ".."

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    # -- lock files ---------------------------------------------------------------------------
    #
    # No `create`: FUSE's CREATE runs under the kernel's lock of the directory, so an O_CREAT
    # open waiting there for its lock would stall every lookup, readdir, create and unlink of
    # the domain. Without it (ENOSYS, once) the kernel makes the file with MKNOD and opens it
    # with OPEN, which waits outside the directory lock.

    async def mknod(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int,
                    rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)  # dlmfs has no mknod: only S_IFREG, which is create
        if parent_inode == ROOT:
            raise FUSEError(errno.EACCES)  # the root holds domains only
        parent = self._node(parent_inode)
        if len(name) >= LOCK_NAME_LIMIT or name.startswith(b"$"):
            raise FUSEError(errno.EINVAL)
        if os.fsdecode(name) in parent.children:
            raise FUSEError(errno.EEXIST)
        node = self._add(parent, os.fsdecode(name), stat.S_IFREG | (mode & ~ctx.umask & 0o7777),
                         ctx)
        purge = self._purges.pop((parent.name, node.name), None)
        if purge is not None:
            purge.cancel()  # made again before its purge: the resource, value block, stays
        return self._looked_up(node)

    async def symlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                      target: pyfuse3.FileNameT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EPERM)

    async def link(self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT,
                   new_name: pyfuse3.FileNameT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old: pyfuse3.InodeT, name_old: pyfuse3.FileNameT,
                     parent_inode_new: pyfuse3.InodeT, name_new: pyfuse3.FileNameT, flags: int,
                     ctx: pyfuse3.RequestContext) -> None:
        raise FUSEError(errno.EPERM)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        raise FUSEError(errno.EINVAL)  # dlmfs has no fsync (ENOSYS would mean "success")

    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        level = Mode.PR if flags & os.O_ACCMODE == os.O_RDONLY else Mode.EX
        await self._hold(node, level, trylock=bool(flags & os.O_NONBLOCK), tid=ctx.pid)
        fh = next(self._fhs)
        self.handles[fh] = Handle(fh, node, level, append=bool(flags & os.O_APPEND))
        node.res.handles.add(fh)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True, keep_cache=False)

    async def _hold(self, node: Node, level: Mode, trylock: bool, tid: int = 0) -> None:
        """Count one more local holder of `level`, asking the lock manager only when the
        cached level is lower (userdlm.c's user_dlm_cluster_lock). Every wait, local or at
        the lock manager, ends by the wait limit when there is one.

        As in dlmfs, the wait itself is not interrupted; but an open that had to wait fails
        with EINTR, no holder counted, when its thread `tid` has a signal to take once the
        lock is the node's (`signals`). The lock stays cached, as dlmfs leaves it."""
        res = node.res
        deadline = math.inf if self.wait_limit is None else trio.current_time() + self.wait_limit
        requester: Requester | None = None
        while True:
            if self.client.closed:
                raise FUSEError(errno.ENOTCONN)
            if node.unlinked:
                raise FUSEError(errno.ENOENT)
            # Waiting locally: for a local holder (--exclusive only), for a conversion in
            # flight, or while the lock gives way to another node below what we want (then
            # trylock or not, as dlmfs does).
            local_wait = self.exclusive and res.conflicts_locally(level)
            if local_wait and trylock:
                raise FUSEError(errno.ETXTBSY)
            local_wait = local_wait or res.busy or (
                res.blocked is not None and level > highest_compatible(res.blocked))
            current = res.level
            if not local_wait and current is not None and current >= level:
                if requester is not None and requester.takes_signal():
                    raise FUSEError(errno.EINTR)
                res.holders[level] += 1
                return
            if requester is None:
                # Seen before the first wait, so that the check once granted cannot take a
                # later thread given the same id for this one.
                requester = Requester.of(tid)
            if local_wait:
                await self._wait(res, deadline)
                continue
            timeout = None if deadline == math.inf else max(0.0, deadline - trio.current_time())
            await self._raise_level(node, level, trylock, timeout)

    @staticmethod
    async def _wait(res: Resource, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await res.wait()
            return
        raise FUSEError(errno.ETIMEDOUT)

    async def _raise_level(self, node: Node, level: Mode, trylock: bool,
                           timeout: float | None) -> None:
        res = node.res
        res.busy = True
        deadlocked = False
        try:
            lock = res.lock
            if trylock:
                timeout = None
            if lock is None or lock.mode is None:
                domain = self.nodes[node.parent].name
                lock = res.lock = self.client.lock(
                    domain, node.name, level,
                    on_blocking=lambda _lock, mode: self._asked_for(node, mode))
                granted = await lock.acquire(blocking=not trylock, timeout=timeout)
            else:
                # With no local holder, a conversion deadlock (both nodes converting PR to
                # EX) demotes ours to NL rather than failing; with holders it fails, and the
                # other node's request makes ours give way once they close.
                flags = Flag.NONE if any(res.holders.values()) else Flag.CONVDEADLK
                granted = await lock.convert(level, blocking=not trylock, timeout=timeout,
                                             flags=flags)
        except DlmError as err:
            if err.errno != errno.EDEADLK:
                raise _fuse_error(err) from None
            deadlocked = True
        finally:
            res.busy = False
            res.changed()
        if deadlocked:
            # The other converter's request makes ours give way (a notification), after which
            # the caller asks again. Waited for here, not busy: `busy` may be another task's
            # by the time this wait ends (clearing it then let a second lock be requested).
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await res.wait()
            return
        if not granted:
            raise FUSEError(errno.ETXTBSY if trylock else errno.ETIMEDOUT)
        if node.unlinked:  # unlinked while we waited for the grant
            await self._unlock(node)

    def _asked_for(self, node: Node, mode: Mode) -> None:
        """Another node waits for `mode` (a blocking notification, from the client's reader:
        must not block)."""
        res = node.res
        res.blocked = mode if res.blocked is None else max(res.blocked, mode)
        res.changed()
        for fh in res.handles:
            self.handles[fh].wake_pollers()
        if not res.unblocking:
            res.unblocking = True
            self.nursery.start_soon(self._give_way, node)

    async def _give_way(self, node: Node) -> None:
        """Lower the cached lock to what the waiting node allows, once no local holder
        conflicts (userdlm.c's user_dlm_unblock_lock)."""
        res = node.res
        try:
            while res.blocked is not None:
                if not res.may_give_way():
                    await res.wait()
                    continue
                lock, target = res.lock, highest_compatible(res.blocked)
                res.blocked = None  # a later notification sets it again
                if lock is None or lock.mode is None or lock.mode <= target:
                    res.changed()
                    continue
                res.busy = True
                try:
                    if target is Mode.NL:
                        # Released, not kept at NL: our next request then queues behind the
                        # waiting node's instead of overtaking it as a conversion would.
                        await lock.release(wait=True)
                    else:
                        await lock.convert(target)
                except DlmError as err:
                    log.warning("giving way on %s/%s: %s", self.nodes[node.parent].name,
                                node.name, err)
                finally:
                    res.busy = False
                    res.changed()
        finally:
            res.unblocking = False

    async def _unlock(self, node: Node) -> None:
        lock = node.res.lock
        if lock is not None and lock.mode is not None:
            try:
                await lock.release(wait=True)
            except DlmError as err:
                log.warning("unlocking %s/%s: %s", self.nodes[node.parent].name, node.name, err)
        node.res.changed()

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EIO)
        lock = handle.node.res.lock
        if lock is None or lock.lost or lock.mode is None:
            raise FUSEError(errno.EIO)
        return handle

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        lock = self._handle(fh).node.res.lock
        assert lock is not None
        if off >= LVB_LEN or not lock.lvb_valid:
            return b""
        return lock.lvb[off:off + size]

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        # dlmfs writes every buffer at the value block's start; the file position only
        # decides ENOSPC (at 64 or past) and how much is taken. O_APPEND is cleared at open
        # there, so an appending descriptor follows its own position, not the file's end.
        handle = self._handle(fh)
        lock = handle.node.res.lock
        assert lock is not None
        if handle.append:
            off = handle.position
        if off >= LVB_LEN:
            raise FUSEError(errno.ENOSPC)
        count = min(len(buf), LVB_LEN - off)
        try:
            lock.write_lvb(buf[:count], 0)
        except DlmError as err:
            raise _fuse_error(err) from None
        if handle.append:
            handle.position += count
        return count

    async def poll(self, inode: pyfuse3.InodeT, fh: pyfuse3.FileHandleT,
                   poll_handle: pyfuse3.PollHandle | None,
                   ctx: pyfuse3.RequestContext) -> int:
        handle = self.handles.get(fh)
        lock = handle.node.res.lock if handle is not None else None
        if handle is None or lock is None or lock.lost:
            return select.POLLERR
        if handle.node.res.blocked is not None:
            return select.POLLIN | select.POLLRDNORM
        if poll_handle is not None:
            handle.poll_handle = poll_handle
        return 0

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        # RELEASE comes when the open file description's last reference goes (however many
        # descriptors, processes or paths shared it): that, and only that, ends its hold.
        # The lock itself stays cached until another node asks for it.
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        res = handle.node.res
        res.handles.discard(fh)
        res.holders[handle.level] -= 1
        res.changed()
        handle.wake_pollers()

    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        node = self._child(parent_inode, name)
        if node.res.handles:
            raise FUSEError(errno.EBUSY)
        parent = self.nodes[parent_inode]
        self._remove(parent, node)
        await self._unlock(node)
        # Forgotten later, as o2dlm purges an unused resource, unless made again meanwhile.
        key = (parent.name, node.name)
        self._purges[key] = scope = trio.CancelScope()
        self.nursery.start_soon(self._purge_later, key, scope)

    async def _purge_later(self, key: tuple[str, str], scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(PURGE_DELAY)
            if self._purges.get(key) is scope:
                del self._purges[key]
                await self._purge(key)

    async def _purge(self, key: tuple[str, str]) -> None:
        try:
            await self.client.drop(*key)
        except DlmError as err:
            # Locked again (EBUSY, by another node or after a new open here) or gone already
            # (ENOENT): the resource stays for its lockers, as o2dlm purges only unused ones.
            if err.errno not in (errno.EBUSY, errno.ENOENT, errno.ENOTCONN):
                log.warning("purging %s/%s: %s", *key, err)

    async def purge_unlinked(self) -> None:
        """Forget at once every resource unlinked and not yet purged (before unmounting, so
        that none is left in the lock manager)."""
        while self._purges:
            key, scope = self._purges.popitem()
            scope.cancel()
            if not self.client.closed:
                await self._purge(key)
