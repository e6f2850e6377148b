"""The lock engine: VMS/Linux DLM semantics as pure logic, with no I/O and no clock.

Theory of operation
-------------------
A *domain* (lockspace) holds *resources*; a resource holds *locks* on three queues:

* granted    -- locks holding `grmode` with nothing pending;
* converting -- granted locks waiting to change mode; they keep `grmode` meanwhile (FIFO);
* waiting    -- new requests, not yet holding anything (FIFO).

Grant order is Linux's `_can_be_granted()` (fs/dlm/lock.c, quoting VMS rules 6-3..6-11):

* a conversion is granted in place when its new mode is compatible with the granted mode of
  every other granted and converting lock (and QUECVT is not set, or nobody is converting);
  otherwise it joins the convert queue, which is served strictly head first;
* a new request is granted at once only when both queues are empty and its mode is compatible
  with every granted mode; once queued it waits for an empty convert queue and for every new
  request ahead of it -- so conversions beat new requests, and a compatible newcomer never
  overtakes a queued incompatible waiter (no writer starvation by a stream of readers);
* a conversion whose granted mode blocks a conversion already queued ahead of it can never be
  granted (the queue is FIFO): that is a conversion deadlock, refused with EDEADLK, or resolved
  by demoting the newcomer to NL when it asked for CONVDEADLK.

Every call returns the *events* it caused, for the caller (the service) to deliver:
`Granted` (a completion: new grant or conversion, with value block and fencing token),
`Cancelled` (a pending request taken back) and `Blocking` (a "bast": a granted lock is in the
way of a queued request). Synchronous refusals (EAGAIN for NOQUEUE, EDEADLK, EBUSY, ...) are
raised as `DlmError`.

Owners are opaque hashable values chosen by the caller (the service uses its connection
objects); `str(owner)` is how an owner is shown in snapshots. Locking in a domain makes the
owner a member; a domain and its resources (with their value blocks) live while it has a member
or a lock, and a lock-free resource lives until it is dropped -- which is what lets a value
block outlive the locks that wrote it, as an NL lock would in VMS.

The state itself (domains, resources, locks, flags, events) is plain data in
`minidisk.dlm.state`; every rule that changes it is here; reading it all out (for `dlm
status`) is `minidisk.dlm.listing`'s.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from minidisk.dlm import listing
from minidisk.dlm.listing import Cursor
from minidisk.dlm.modes import COMPATIBLE, LvbAction, Mode, compatible, lvb_action
from minidisk.dlm.state import (
    LVB_LEN,
    Blocking,
    Cancelled,
    Domain,
    Event,
    Flag,
    Granted,
    LockState,
    Owner,
    Resource,
)

NAME_MAX = 64  # bytes, for domain and resource names (Linux DLM_RESNAME_MAXLEN)

_NOQUEUE = Flag.NOQUEUE.value
_PERSISTENT = Flag.PERSISTENT.value
_IVVALBLK = Flag.IVVALBLK.value
_ORPHAN = Flag.ORPHAN.value
_NOQUEUEBAST = Flag.NOQUEUEBAST.value
# Sets of modes as bits (1 << mode); for each requested mode, the granted modes that block it.
_BIT = tuple(1 << mode for mode in Mode)
_BLOCKERS = tuple(sum(_BIT[held] for held in Mode if not COMPATIBLE[held][wanted])
                  for wanted in Mode)
# `Resource.notified` when nothing is blocked.
_NOTHING_BLOCKED: frozenset[Mode] = frozenset()


class DlmError(OSError):
    """A refused operation; `errno` says why (EAGAIN, EDEADLK, EBUSY, ENOENT, EINVAL...)."""

    def __init__(self, err: int, detail: str, events: list[Event] | None = None) -> None:
        super().__init__(err, f"{os.strerror(err)}: {detail}")
        self.detail = detail
        # Events the refused call still caused (the basts of a NOQUEUEBAST trylock).
        self.events: list[Event] = events or []


def check_name(kind: str, name: str) -> None:
    raw = name.encode()
    if not raw or len(raw) > NAME_MAX or b"\0" in raw:
        raise DlmError(errno.EINVAL, f"{kind} name must be 1..{NAME_MAX} bytes without NUL")


class Engine:
    """All domains, resources and locks of one lock manager."""

    def __init__(self, first_token: int = 1, *, max_locks: int | None = None,
                 max_resources: int | None = None) -> None:
        """`max_locks` and `max_resources` (None: no limit) bound what all owners together
        can make it hold; past them a new lock is refused with ENOLCK and a new resource
        with ENOSPC."""
        self.max_locks = max_locks
        self.max_resources = max_resources
        self._resource_count = 0  # in every domain, lock-free ones (value blocks) included
        self._domains: dict[str, Domain] = {}
        self._locks: dict[int, LockState] = {}
        self._by_owner: dict[Owner, dict[int, LockState]] = {}
        self._memberships: dict[Owner, set[str]] = {}
        self._next_lkid = 1
        # One counter for every resource: strictly increasing per resource even when a
        # resource is dropped and created again.
        self._next_token = first_token

    # -- queries --------------------------------------------------------------------------

    def state(self, lkid: int) -> LockState:
        try:
            return self._locks[lkid]
        except KeyError:
            raise DlmError(errno.ENOENT, f"no lock {lkid}") from None

    def domains(self) -> list[str]:
        return sorted(self._domains)

    def memberships(self, owner: Owner) -> Collection[str]:
        """The domains `owner` is a member of."""
        return self._memberships.get(owner, ())

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain JSON-able data (`minidisk.dlm.listing`)."""
        return listing.snapshot(self._domains)

    def listing(self, after: Cursor | None = None) -> Iterator[tuple[Cursor, str, Any]]:
        """Everything, one small piece at a time, resuming after `after`
        (`minidisk.dlm.listing`: what a piece is, how pages stay consistent)."""
        return listing.pieces(self._domains, after)

    # -- domains and resources --------------------------------------------------------------

    def join(self, owner: Owner, domain: str) -> None:
        self._domain(domain).members.add(owner)
        self._memberships.setdefault(owner, set()).add(domain)

    def leave(self, owner: Owner, domain: str) -> None:
        dom = self._domains.get(domain)
        if dom is None or owner not in dom.members:
            raise DlmError(errno.ENOENT, f"not a member of domain {domain!r}")
        dom.members.discard(owner)
        self._memberships.get(owner, set()).discard(domain)
        self._collect(dom)

    def drop(self, domain: str, name: str) -> None:
        """Forget a resource and its value block; EBUSY while it has any lock."""
        dom = self._domains.get(domain)
        res = None if dom is None else dom.resources.get(name)
        if dom is None or res is None:
            raise DlmError(errno.ENOENT, f"no resource {name!r} in domain {domain!r}")
        if res.has_locks():
            raise DlmError(errno.EBUSY, f"resource {name!r} has locks")
        del dom.resources[name]
        self._resource_count -= 1
        self._collect(dom)

    # -- lock operations --------------------------------------------------------------------

    def request(self, owner: Owner, domain: str, name: str, mode: Mode,
                flags: Flag = Flag.NONE) -> tuple[int, list[Event]]:
        """A new lock. Returns its id and the events (its own `Granted` if granted at once)."""
        dom = self._domains.get(domain) or self._domain(domain)
        bits = int(flags)  # plain int operations: IntFlag's cost a microsecond each
        if (self.max_locks is not None and len(self._locks) >= self.max_locks
                and not bits & _ORPHAN):
            self._collect(dom)
            raise DlmError(errno.ENOLCK, f"the lock manager holds {len(self._locks)} locks, "
                                         "the most it allows")
        res = dom.resources.get(name)
        if res is None:
            check_name("resource", name)  # a resource that exists has a good name
            if self.max_resources is not None and self._resource_count >= self.max_resources:
                self._collect(dom)
                raise DlmError(errno.ENOSPC, f"the lock manager holds {self._resource_count} "
                                             "resources, the most it allows")
            res = dom.resources[name] = Resource(dom, name)
            self._resource_count += 1
        events: list[Event] = []
        if bits & _ORPHAN:
            return self._adopt(owner, res, mode, events), events
        lk = LockState(self._next_lkid, owner, res, None, mode,
                       persistent=bool(bits & _PERSISTENT), rqflags=flags)
        if not res.converting and not res.waiting and not self._conflicts(res, lk):
            self._register(lk, res.granted)
            self._grant(lk, events)
            return lk.lkid, events
        if bits & _NOQUEUE:
            if bits & _NOQUEUEBAST:
                self._notify_holders(res, res.holders(), mode, events)
            self._collect(dom)
            raise DlmError(errno.EAGAIN, f"{name!r} {mode.name} not grantable now", events)
        self._register(lk, res.waiting)
        self._blocked_by(res, mode)
        self._send_basts(res, events)
        return lk.lkid, events

    def convert(self, lkid: int, mode: Mode, flags: Flag = Flag.NONE,
                lvb: bytes | None = None) -> list[Event]:
        """Change a granted lock's mode. `lvb` is the holder's value block, stored if this is a
        PW/EX down-conversion."""
        lk = self._owned(lkid)
        if lk.grmode is None or lk.rqmode is not None:
            raise DlmError(errno.EBUSY, f"lock {lkid} has a request pending")
        res = lk.resource
        lk.rqmode, lk.rqflags, lk.pending_lvb = mode, flags, lvb
        events: list[Event] = []
        if self._convertible_now(res, lk):
            self._grant(lk, events)
            self._settle(res, events)
            return events
        if flags & Flag.NOQUEUE:
            if flags & Flag.NOQUEUEBAST:
                self._notify_holders(res, res.holders(), mode, events)
            self._revert(lk)
            raise DlmError(errno.EAGAIN, f"{res.name!r} {mode.name} not grantable now",
                           events)
        if self._conversion_deadlock(res, lk):
            if not flags & Flag.CONVDEADLK:
                self._revert(lk)
                raise DlmError(errno.EDEADLK, f"conversion deadlock on {res.name!r}")
            self._set_grmode(lk, Mode.NL)
            lk.demoted = True
            # The demotion may let queued conversions through, and then perhaps this one.
            self._grant_pending(res, events, conversions_only=True)
            if self._convertible_now(res, lk):
                self._grant(lk, events)
                self._settle(res, events)
                return events
        del res.granted[lkid]
        res.converting[lkid] = lk
        self._blocked_by(res, mode)
        self._settle(res, events)
        return events

    def unlock(self, lkid: int, lvb: bytes | None = None,
               flags: Flag = Flag.NONE) -> list[Event]:
        """Release a granted lock; a PW/EX holder's `lvb` is stored (or invalidated by
        IVVALBLK). EBUSY while a request is pending: cancel it first."""
        lk = self._owned(lkid)
        if lk.rqmode is not None:
            raise DlmError(errno.EBUSY, f"lock {lkid} has a request pending; cancel it first")
        res = lk.resource
        assert lk.grmode is not None
        if lk.grmode >= Mode.PW:
            self._store_lvb(res, lvb, invalidate=bool(int(flags) & _IVVALBLK))
        self._unregister(lk)
        events: list[Event] = []
        self._settle(res, events)
        self._collect(res.domain)
        return events

    def cancel(self, lkid: int) -> list[Event]:
        """Take back a pending request (the lock goes away) or conversion (the lock returns to
        its granted mode). EBUSY when nothing is pending (it was granted meanwhile)."""
        lk = self._owned(lkid)
        if lk.rqmode is None:
            raise DlmError(errno.EBUSY, f"lock {lkid} has nothing pending")
        res = lk.resource
        events: list[Event] = []
        if lk.grmode is None:
            self._unregister(lk)
            events.append(Cancelled(lkid, lk.owner, None))
        else:
            del res.converting[lkid]
            res.granted[lkid] = lk
            res.notified = None  # back among the granted, which basts go to
            self._revert(lk)
            events.append(Cancelled(lkid, lk.owner, lk.grmode))
        self._settle(res, events)
        self._collect(res.domain)
        return events

    def owner_gone(self, owner: Owner) -> list[Event]:
        """The owner died or disconnected: its locks are released, except PERSISTENT granted
        ones, which become orphans (their pending conversions cancelled). A released PW/EX lock
        leaves the value block invalid: the holder may have been half-way through an update."""
        events: list[Event] = []
        touched: dict[int, Resource] = {}
        for lk in list(self._by_owner.get(owner, {}).values()):
            res = lk.resource
            touched[id(res)] = res
            if lk.persistent and lk.grmode is not None:
                if lk.rqmode is not None:
                    res.converting.pop(lk.lkid, None)
                    res.granted[lk.lkid] = lk
                    res.notified = None
                    self._revert(lk)
                lk.owner, lk.orphan_of = None, owner
                continue
            if lk.grmode is not None and lk.grmode >= Mode.PW:
                res.lvb_valid = False
            self._unregister(lk)
        self._by_owner.pop(owner, None)
        for name in self._memberships.pop(owner, set()):
            if name in self._domains:
                self._domains[name].members.discard(owner)
        for res in touched.values():
            self._settle(res, events)
        for dom in list(self._domains.values()):
            self._collect(dom)
        return events

    def purge(self, domain: str | None = None,
              dead_owner: Callable[[Owner], bool] | None = None) -> tuple[int, list[Event]]:
        """Remove orphans (of one domain, of owners matching `dead_owner`, or all of them).
        Returns how many were removed and the grants that followed."""
        events: list[Event] = []
        touched: dict[int, Resource] = {}
        count = 0
        for lk in list(self._locks.values()):
            if lk.owner is not None:
                continue
            if domain is not None and lk.resource.domain.name != domain:
                continue
            if dead_owner is not None and not dead_owner(lk.orphan_of):
                continue
            res = lk.resource
            if lk.grmode is not None and lk.grmode >= Mode.PW:
                res.lvb_valid = False
            self._unregister(lk)
            touched[id(res)] = res
            count += 1
        for res in touched.values():
            self._settle(res, events)
            self._collect(res.domain)
        return count, events

    # -- internals ------------------------------------------------------------------------

    def _domain(self, name: str) -> Domain:
        dom = self._domains.get(name)
        if dom is None:
            check_name("domain", name)
            dom = self._domains[name] = Domain(name)
        return dom

    def _collect(self, dom: Domain) -> None:
        """A domain with no member and no lock goes away, with its resources."""
        if not dom.members and dom.lock_count == 0 and self._domains.get(dom.name) is dom:
            del self._domains[dom.name]
            self._resource_count -= len(dom.resources)

    def _owned(self, lkid: int) -> LockState:
        lk = self.state(lkid)
        if lk.owner is None:
            raise DlmError(errno.EPERM, f"lock {lkid} is an orphan; adopt it with ORPHAN")
        return lk

    def _register(self, lk: LockState, queue: dict[int, LockState]) -> None:
        self._next_lkid += 1
        queue[lk.lkid] = lk
        self._locks[lk.lkid] = lk
        assert lk.owner is not None
        owned = self._by_owner.get(lk.owner)
        if owned is None:
            owned = self._by_owner[lk.owner] = {}
        owned[lk.lkid] = lk
        dom = lk.resource.domain
        dom.lock_count += 1
        if lk.owner not in dom.members:
            self.join(lk.owner, dom.name)

    def _unregister(self, lk: LockState) -> None:
        res = lk.resource
        for queue in (res.granted, res.converting, res.waiting):
            queue.pop(lk.lkid, None)
        if lk.grmode is not None:
            self._unhold(res, lk.grmode)
        del self._locks[lk.lkid]
        if lk.owner is not None:
            self._by_owner.get(lk.owner, {}).pop(lk.lkid, None)
        res.domain.lock_count -= 1

    def _adopt(self, owner: Owner, res: Resource, mode: Mode, events: list[Event]) -> int:
        for lk in res.granted.values():
            if lk.owner is None and lk.grmode == mode:
                lk.owner, lk.orphan_of = owner, None
                self._by_owner.setdefault(owner, {})[lk.lkid] = lk
                if owner not in res.domain.members:
                    self.join(owner, res.domain.name)
                # Adoption is a grant: a fresh token, and the value block is read.
                self._set_grmode(lk, None)
                lk.rqmode = mode
                self._grant(lk, events)
                return lk.lkid
        raise DlmError(errno.ENOENT, f"no {mode.name} orphan on {res.name!r}")

    def _conflicts(self, res: Resource, lk: LockState) -> bool:
        """Does any holder but `lk` itself hold a mode that blocks `lk`'s request?"""
        assert lk.rqmode is not None
        present, own = res.held_modes, lk.grmode
        if own is not None and res.held[own] == 1:
            present ^= _BIT[own]  # `lk` is its mode's only holder
        return present & _BLOCKERS[lk.rqmode] != 0

    @staticmethod
    def _unhold(res: Resource, mode: Mode) -> None:
        """One holder of `mode` fewer."""
        held = res.held
        held[mode] -= 1
        if not held[mode]:
            res.held_modes &= ~_BIT[mode]

    def _set_grmode(self, lk: LockState, mode: Mode | None) -> None:
        """Change a holder's granted mode, keeping its resource's `held` counts."""
        res = lk.resource
        if lk.grmode is not None:
            self._unhold(res, lk.grmode)
        if mode is not None:
            res.held[mode] += 1
            res.held_modes |= _BIT[mode]
        lk.grmode = mode

    @staticmethod
    def _blocked_by(res: Resource, mode: Mode) -> None:
        """A request for `mode` joined a queue: holders may need basts for it, unless the
        blocked modes of the last full look included it."""
        if res.notified is not None and mode not in res.notified:
            res.notified = None

    def _convertible_now(self, res: Resource, lk: LockState) -> bool:
        if self._conflicts(res, lk):
            return False
        return not (lk.rqflags & Flag.QUECVT) or not res.converting

    def _conversion_deadlock(self, res: Resource, lk: LockState) -> bool:
        """Would `lk` wait forever behind a queued conversion that its own granted mode blocks?
        (Linux `conversion_deadlock_detect`, for a conversion not yet queued.)"""
        assert lk.grmode is not None
        return any(
            ahead.rqmode is not None and not compatible(lk.grmode, ahead.rqmode)
            for ahead in res.converting.values()
        )

    def _revert(self, lk: LockState) -> None:
        lk.rqmode, lk.rqflags, lk.pending_lvb = None, Flag.NONE, None

    def _take_token(self) -> int:
        token = self._next_token
        self._next_token += 1
        return token

    def _store_lvb(self, res: Resource, lvb: bytes | None, invalidate: bool) -> None:
        if invalidate:
            res.lvb_valid = False
        elif lvb is not None:
            # A holder that never set its copy sends nothing, so an untouched value block
            # keeps its sequence number (and stays invalid if it was).
            res.lvb = bytes(lvb[:LVB_LEN]).ljust(LVB_LEN, b"\0")
            res.lvb_seq += 1
            res.lvb_valid = True

    def _grant(self, lk: LockState, events: list[Event]) -> None:
        res = lk.resource
        mode = lk.rqmode
        assert mode is not None
        action = lvb_action(lk.grmode, mode)
        if action is LvbAction.WRITE:
            self._store_lvb(res, lk.pending_lvb,
                            invalidate=bool(int(lk.rqflags) & _IVVALBLK))
        if lk.lkid in res.converting:
            del res.converting[lk.lkid]
            res.granted[lk.lkid] = lk
        elif lk.lkid in res.waiting:
            del res.waiting[lk.lkid]
            res.granted[lk.lkid] = lk
        if lk.grmode is not None:  # (`_set_grmode`, inlined: every grant passes here)
            self._unhold(res, lk.grmode)
        res.held[mode] += 1
        res.held_modes |= _BIT[mode]
        lk.grmode = mode
        # A new holder, which no bast has reached yet: look at it (alone, if it is the only
        # one since the last look).
        if res.notified is not None:
            if res.fresh is None:
                res.fresh = lk
            elif res.fresh is not lk:
                res.notified = None
        lk.token = self._take_token()
        events.append(Granted(
            lk.lkid, lk.owner, mode, lk.token,
            res.lvb if action is LvbAction.READ else None,
            res.lvb_seq, res.lvb_valid, lk.demoted,
        ))
        lk.bast_mode = None
        lk.demoted = False
        self._revert(lk)

    def _grant_pending(self, res: Resource, events: list[Event],
                       conversions_only: bool = False) -> None:
        """Grant queued requests in order: the convert queue head first, repeatedly; then, once
        nobody is converting, the wait queue head, repeatedly."""
        while res.converting:
            head = next(iter(res.converting.values()))
            if self._conflicts(res, head):
                return
            self._grant(head, events)
        if conversions_only:
            return
        while res.waiting:
            head = next(iter(res.waiting.values()))
            if self._conflicts(res, head):
                return
            self._grant(head, events)

    def _settle(self, res: Resource, events: list[Event]) -> None:
        """After any change: grant what can be granted, then notify holders in the way."""
        self._grant_pending(res, events)
        self._send_basts(res, events)

    def _send_basts(self, res: Resource, events: list[Event]) -> None:
        """Tell each granted lock in the way of a blocked request, for each blocked mode in
        queue order (a mode that comes again has nothing more to tell)."""
        notified, fresh = res.notified, res.fresh
        if notified is not None and fresh is None:
            return
        if not res.converting and not res.waiting:
            res.notified, res.fresh = _NOTHING_BLOCKED, None
            return
        # Every other holder has heard all it must: the fresh one alone (if still granted).
        holders = res.granted.values() if notified is None else (
            (fresh,) if fresh is not None and fresh.lkid in res.granted else ())
        modes = set()
        for blocked in (*res.converting.values(), *res.waiting.values()):
            mode = blocked.rqmode
            assert mode is not None
            if mode not in modes:
                modes.add(mode)
                self._notify_holders(res, holders, mode, events)
        # What every granted lock has heard all it must for: the modes blocked now (those of
        # the last look may include some that are not, which the fresh one was not told of).
        res.notified = modes
        res.fresh = None

    def _notify_holders(self, res: Resource, holders: Iterable[LockState], mode: Mode,
                        events: list[Event]) -> None:
        """Send a bast for `mode` to each holder it conflicts with, once per mode: a holder
        already told about this mode or a higher one since its last grant hears nothing."""
        for holder in holders:
            if holder.owner is None or holder.grmode is None:
                continue  # orphans have nobody to tell
            if compatible(holder.grmode, mode):
                continue
            if holder.bast_mode is not None and holder.bast_mode >= mode:
                continue
            holder.bast_mode = mode
            events.append(Blocking(holder.lkid, holder.owner, mode))
