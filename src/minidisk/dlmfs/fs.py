"""The dlmfs `pyfuse3.Operations`: a two-level tree (domains, then lock files) kept locally,
each open file description holding one lock in the lock manager. Semantics: see the package
docstring."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3
from pyfuse3 import FUSEError

from minidisk.dlm.client import DlmClient
from minidisk.dlm.engine import LVB_LEN, DlmError
from minidisk.dlm.lock import Lock
from minidisk.dlm.modes import Mode
from minidisk.dlmfs import holders

log = logging.getLogger("minidisk.dlmfs")

DOMAIN_NAME_LIMIT = 64  # GROUP_NAME_MAX: a domain name must be shorter
LOCK_NAME_LIMIT = 32    # DLM_LOCKID_NAME_MAX in dlmfs: a lock name must be shorter
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
    open_handles: set[int] = field(default_factory=set)
    lookups: int = 0
    unlinked: bool = False
    times_ns: list[int] = field(default_factory=lambda: [time.time_ns()] * 3)  # a, m, c
    path: str = ""  # where a lock file is, under the mountpoint (set at its first close)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(eq=False)
class Handle:
    fh: int
    node: Node
    lock: Lock
    opener: int  # the pid that opened it
    dropped: bool = False
    kept: bool = False  # a FLUSH found it maybe still referenced, so RELEASE will drop it
    poll_handle: pyfuse3.PollHandle | None = None

    def wake_pollers(self) -> None:
        if self.poll_handle is not None:
            self.poll_handle.notify()
            self.poll_handle = None


def _fuse_error(err: DlmError) -> FUSEError:
    return FUSEError(err.errno or errno.EIO)


class DlmFs(pyfuse3.Operations):
    """Lock files over one lock manager connection (`client`)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, client: DlmClient, mountpoint: str, wait_limit: float) -> None:
        super().__init__()
        self.client = client
        self.mountpoint = os.path.abspath(mountpoint)
        self.wait_limit = wait_limit
        self.nodes: dict[int, Node] = {
            ROOT: Node(ROOT, "", ROOT, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
        }
        self.handles: dict[int, Handle] = {}
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
        attrs.st_blksize = 512
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
        data.f_namemax = DOMAIN_NAME_LIMIT - 1
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
        for name, ino in sorted(self._node(fh).children.items(), key=lambda item: item[1]):
            if ino <= start_id:
                continue
            node = self.nodes[ino]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), ino):
                return
            node.lookups += 1

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    # -- lock files ---------------------------------------------------------------------------

    async def create(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int,
                     flags: int, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode == ROOT:
            raise FUSEError(errno.EACCES)  # the root holds domains only
        parent = self._node(parent_inode)
        if len(name) >= LOCK_NAME_LIMIT or name.startswith(b"$"):
            raise FUSEError(errno.EINVAL)
        existing = parent.children.get(os.fsdecode(name))
        if existing is not None:
            node = self.nodes[existing]
        else:
            node = self._add(parent, os.fsdecode(name),
                             stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx)
        # The inode exists from here on, whether or not the lock below is granted.
        info = await self._lock(node, flags, ctx.pid)
        return info, self._looked_up(node)

    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        return await self._lock(node, flags, ctx.pid)

    async def _lock(self, node: Node, flags: int, opener: int) -> pyfuse3.FileInfo:
        if self.client.closed:
            raise FUSEError(errno.ENOTCONN)
        mode = Mode.PR if flags & os.O_ACCMODE == os.O_RDONLY else Mode.EX
        fh = next(self._fhs)
        domain = self.nodes[node.parent].name
        lock = self.client.lock(domain, node.name, mode,
                                on_blocking=lambda _lock, _mode: self._bast(fh))
        trylock = bool(flags & os.O_NONBLOCK)
        try:
            granted = await lock.acquire(blocking=not trylock,
                                         timeout=None if trylock else self.wait_limit)
        except DlmError as err:
            raise _fuse_error(err) from None
        if not granted:
            raise FUSEError(errno.ETXTBSY if trylock else errno.ETIMEDOUT)
        if node.unlinked:  # unlinked while we waited for the grant
            await lock.release()
            raise FUSEError(errno.ENOENT)
        self.handles[fh] = Handle(fh, node, lock, opener)
        node.open_handles.add(fh)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True, keep_cache=False)

    def _bast(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if handle is not None:
            handle.wake_pollers()

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None or handle.dropped or handle.lock.lost:
            raise FUSEError(errno.EIO)
        return handle

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        lock = self._handle(fh).lock
        if off >= LVB_LEN or not lock.lvb_valid:
            return b""
        return lock.lvb[off:off + size]

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        lock = self._handle(fh).lock
        try:
            return lock.write_lvb(buf, off)
        except DlmError as err:
            raise _fuse_error(err) from None

    async def poll(self, inode: pyfuse3.InodeT, fh: pyfuse3.FileHandleT,
                   poll_handle: pyfuse3.PollHandle | None,
                   ctx: pyfuse3.RequestContext) -> int:
        handle = self.handles.get(fh)
        if handle is None or handle.dropped or handle.lock.lost:
            return select.POLLERR
        if handle.lock.blocking is not None:
            return select.POLLIN | select.POLLRDNORM
        if poll_handle is not None:
            handle.poll_handle = poll_handle
        return 0

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        # close(2) waits for FLUSH, not for RELEASE: dropping the lock here is what makes it
        # free by the time close returns -- unless this was not the description's last
        # descriptor (dup2, fork), which `holders` estimates.
        handle = self.handles.get(fh)
        if handle is None or handle.dropped:
            return
        node = handle.node
        others = [self.handles[h] for h in node.open_handles
                  if h != fh and not self.handles[h].kept]
        path = node.path
        if not path:
            path = node.path = os.path.join(self.mountpoint, self.nodes[node.parent].name,
                                            node.name)
        if holders.still_referenced(path, [handle.opener, *(h.opener for h in others)],
                                    len(others)):
            handle.kept = True
            return
        await self._drop(fh)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        await self._drop(fh)
        handle = self.handles.pop(fh, None)
        if handle is not None:
            handle.wake_pollers()

    async def _drop(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if handle is None or handle.dropped:
            return
        handle.dropped = True
        handle.node.open_handles.discard(fh)
        try:
            # close(2) must return with the lock free for everyone: wait=True. The mount's
            # connection is prompt-unlock (see `connect`), so that is done once the unlock is
            # in the socket -- the service handles it before anyone's later request.
            await handle.lock.release(wait=True)
        except DlmError as err:
            log.warning("dropping %s/%s: %s", self.nodes[handle.node.parent].name,
                        handle.node.name, err)

    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        node = self._child(parent_inode, name)
        if node.open_handles:
            raise FUSEError(errno.EBUSY)
        parent = self.nodes[parent_inode]
        self._remove(parent, node)
        try:
            await self.client.drop(parent.name, node.name)
        except DlmError as err:
            # Still locked elsewhere (EBUSY) or never locked (ENOENT): the resource stays for
            # them, and this mount forgets it, as dlmfs forgets its inode.
            if err.errno not in (errno.EBUSY, errno.ENOENT, errno.ENOTCONN):
                raise _fuse_error(err) from None
