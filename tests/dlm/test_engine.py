"""The pure engine: grant order, conversions, deadlock, trylock, cancel, value blocks, fencing
tokens, orphans. Each test drives one resource through `Engine` and checks the events."""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidisk.dlm.engine import DlmError, Engine
from minidisk.dlm.modes import Mode, compatible
from minidisk.dlm.state import LVB_LEN, Blocking, Cancelled, Event, Flag, Granted

NL, CR, CW, PR, PW, EX = Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX


class Bench:
    """One engine, one resource "d/r", and a log of every event."""

    def __init__(self) -> None:
        self.engine = Engine()
        self.events: list[Event] = []

    def lock(self, owner: str, mode: Mode, flags: Flag = Flag.NONE, name: str = "r") -> int:
        lkid, events = self.engine.request(owner, "d", name, mode, flags)
        self.events += events
        return lkid

    def convert(self, lkid: int, mode: Mode, flags: Flag = Flag.NONE,
                lvb: bytes | None = None) -> None:
        self.events += self.engine.convert(lkid, mode, flags, lvb)

    def unlock(self, lkid: int, lvb: bytes | None = None, flags: Flag = Flag.NONE) -> None:
        self.events += self.engine.unlock(lkid, lvb, flags)

    def cancel(self, lkid: int) -> None:
        self.events += self.engine.cancel(lkid)

    def gone(self, owner: str) -> None:
        self.events += self.engine.owner_gone(owner)

    def take(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def grants(self) -> list[tuple[int, Mode]]:
        return [(e.lkid, e.mode) for e in self.take() if isinstance(e, Granted)]

    def mode(self, lkid: int) -> Mode | None:
        return self.engine.state(lkid).grmode

    def queues(self, name: str = "r") -> tuple[list[int], list[int], list[int]]:
        res = next(r for d in self.engine.snapshot()["domains"] for r in d["resources"]
                   if r["name"] == name)
        return tuple([lk["lkid"] for lk in res[q]]  # type: ignore[return-value]
                     for q in ("granted", "converting", "waiting"))


@pytest.mark.parametrize(("held", "wanted"), list(itertools.product(Mode, Mode)),
                         ids=lambda m: m.name)
def test_matrix_decides_grants(held: Mode, wanted: Mode) -> None:
    b = Bench()
    a = b.lock("A", held)
    b.take()
    w = b.lock("B", wanted)
    events = b.take()
    if compatible(held, wanted):
        assert [(e.lkid, e.mode) for e in events if isinstance(e, Granted)] == [(w, wanted)]
        assert not any(isinstance(e, Blocking) for e in events)
    else:
        assert events == [Blocking(a, "A", wanted)]
        assert b.queues() == ([a], [], [w])
        b.unlock(a)
        assert b.grants() == [(w, wanted)]


def test_conversion_beats_earlier_new_request() -> None:
    b = Bench()
    a, c = b.lock("A", PR), b.lock("C", PR)
    x = b.lock("X", EX)              # queued behind the two readers
    b.convert(a, EX)                 # queued as a conversion (C's PR is in the way)
    d = b.lock("D", PR)              # compatible with both PRs, but must not overtake X
    assert b.queues() == ([c], [a], [x, d])
    b.take()
    b.unlock(c)
    assert b.grants() == [(a, EX)]   # the conversion first, although X asked earlier
    b.unlock(a)
    assert b.grants() == [(x, EX)]
    b.unlock(x)
    assert b.grants() == [(d, PR)]


def test_compatible_newcomer_never_overtakes_incompatible_waiter() -> None:
    b = Bench()
    a = b.lock("A", PR)
    x = b.lock("X", EX)
    r = b.lock("R", CR)              # compatible with A's PR; X's EX is queued ahead
    assert b.queues() == ([a], [], [x, r])
    b.take()
    b.unlock(a)
    assert b.grants() == [(x, EX)]
    b.unlock(x)
    assert b.grants() == [(r, CR)]


def test_ex_waiter_not_starved_by_stream_of_pr() -> None:
    b = Bench()
    readers = [b.lock(f"R{i}", PR) for i in range(3)]
    x = b.lock("X", EX)
    b.take()
    granted_after_x: list[tuple[int, Mode]] = []
    for i in range(3, 50):
        readers.append(b.lock(f"R{i}", PR))     # a reader arrives...
        old = readers.pop(0)
        if b.mode(old) is not None:
            b.unlock(old)                       # ...and the oldest granted reader leaves
        granted_after_x += b.grants()
        if (x, EX) in granted_after_x:
            break
    assert granted_after_x[0] == (x, EX), granted_after_x
    assert i == 5  # exactly when the three readers that were ahead of X had gone


def test_conversion_deadlock_refused_with_edeadlk() -> None:
    b = Bench()
    a, c = b.lock("A", PR), b.lock("C", PR)
    b.convert(a, EX)
    b.take()
    with pytest.raises(DlmError) as err:
        b.convert(c, EX)
    assert err.value.errno == errno.EDEADLK
    assert b.mode(c) == PR and b.engine.state(c).rqmode is None
    assert b.queues() == ([c], [a], [])
    b.unlock(c)
    assert b.grants() == [(a, EX)]


def test_conversion_deadlock_demotes_with_convdeadlk() -> None:
    b = Bench()
    a, c = b.lock("A", PR), b.lock("C", PR)
    b.convert(a, EX)
    b.take()
    b.convert(c, EX, Flag.CONVDEADLK)
    events = b.take()
    assert (a, EX) in [(e.lkid, e.mode) for e in events if isinstance(e, Granted)]
    assert b.mode(c) == NL and b.queues() == ([a], [c], [])
    b.unlock(a)
    (grant,) = [e for e in b.take() if isinstance(e, Granted)]
    assert (grant.lkid, grant.mode, grant.demoted) == (c, EX, True)


def test_trylock_never_queues() -> None:
    b = Bench()
    a = b.lock("A", EX)
    b.take()
    for mode in (CR, PR, EX):
        with pytest.raises(DlmError) as err:
            b.lock("T", mode, Flag.NOQUEUE)
        assert err.value.errno == errno.EAGAIN
    assert b.queues() == ([a], [], []) and b.take() == []   # no bast without NOQUEUEBAST
    with pytest.raises(DlmError) as err:
        b.lock("T", PR, Flag.NOQUEUE | Flag.NOQUEUEBAST)
    assert err.value.events == [Blocking(a, "A", PR)]
    # Compatible with every holder, but a queued waiter is ahead: still refused.
    b.convert(a, PR)
    w = b.lock("W", EX)
    with pytest.raises(DlmError):
        b.lock("T", PR, Flag.NOQUEUE)
    assert b.queues() == ([a], [], [w])


def test_conversion_trylock_keeps_mode() -> None:
    b = Bench()
    a, c = b.lock("A", PR), b.lock("C", PR)
    with pytest.raises(DlmError) as err:
        b.convert(a, EX, Flag.NOQUEUE)
    assert err.value.errno == errno.EAGAIN
    assert b.mode(a) == PR and b.queues() == ([a, c], [], [])


def test_cancel_conversion_restores_old_mode() -> None:
    b = Bench()
    a, c = b.lock("A", PR), b.lock("C", PR)
    token = b.engine.state(a).token
    b.convert(a, EX)
    b.take()
    b.cancel(a)
    assert b.take() == [Cancelled(a, "A", PR)]
    assert b.mode(a) == PR and b.engine.state(a).token == token
    assert b.queues() == ([c, a], [], [])
    with pytest.raises(DlmError) as err:
        b.cancel(a)
    assert err.value.errno == errno.EBUSY   # nothing pending any more
    b.unlock(c)
    assert b.take() == []                   # A does not turn into EX behind our back


def test_cancel_waiter_lets_the_ones_behind_through() -> None:
    b = Bench()
    a = b.lock("A", PR)
    x = b.lock("X", EX)
    r = b.lock("R", PR)
    b.take()
    b.cancel(x)
    assert b.take() == [Cancelled(x, "X", None), Granted(r, "R", PR, 2, bytes(LVB_LEN), 0,
                                                         True, False)]
    assert b.queues() == ([a, r], [], [])
    with pytest.raises(DlmError) as err:
        b.engine.state(x)
    assert err.value.errno == errno.ENOENT


def test_quecvt_orders_compatible_conversions() -> None:
    for flags, expect_queued in ((Flag.NONE, False), (Flag.QUECVT, True)):
        b = Bench()
        a, c = b.lock("A", PR), b.lock("C", PR)
        n = b.lock("N", NL)
        b.convert(a, EX)
        b.take()
        b.convert(n, CR, flags)                 # compatible with every granted mode
        assert (b.mode(n) == NL) is expect_queued
        if expect_queued:
            assert b.queues()[1] == [a, n]
            b.unlock(c)
            assert b.grants() == [(a, EX)]      # first in, first granted
            b.unlock(a)
            assert b.grants() == [(n, CR)]


def test_unlock_with_pending_request_is_busy() -> None:
    b = Bench()
    a, c = b.lock("A", PR), b.lock("C", PR)
    b.convert(a, EX)
    with pytest.raises(DlmError) as err:
        b.unlock(a)
    assert err.value.errno == errno.EBUSY
    del c


def test_down_conversion_is_immediate_and_wakes_waiters() -> None:
    b = Bench()
    a = b.lock("A", EX)
    r1, r2 = b.lock("R1", PR), b.lock("R2", PR)
    b.take()
    b.convert(a, PR)
    assert b.grants() == [(a, PR), (r1, PR), (r2, PR)]


def test_bast_once_per_mode_and_reset_by_grant() -> None:
    b = Bench()
    b.lock("A", CR)
    b.take()
    b.lock("W1", PW)          # compatible with CR: granted, no bast
    assert [type(e) for e in b.take()] == [Granted]
    b2 = Bench()
    a = b2.lock("A", PR)
    b2.take()
    b2.lock("W1", PW)
    assert b2.take() == [Blocking(a, "A", PW)]
    b2.lock("W2", PW)
    assert b2.take() == []                  # already told about PW
    b2.lock("W3", EX)
    assert b2.take() == [Blocking(a, "A", EX)]
    b2.convert(a, NL)                       # a grant resets the memory...
    b2.take()
    b2.convert(a, CR)                       # ...CR is compatible with PW: granted
    assert b2.grants() == [(a, CR)]


def test_value_block_rules() -> None:
    b = Bench()
    a = b.lock("A", EX)
    (g,) = b.take()
    assert isinstance(g, Granted)
    assert (g.lvb, g.lvb_seq, g.lvb_valid) == (bytes(LVB_LEN), 0, True)
    b.unlock(a, lvb=b"one")
    r = b.lock("R", PR)
    (g,) = b.take()
    assert isinstance(g, Granted)
    assert g.lvb == b"one".ljust(LVB_LEN, b"\0") and g.lvb_seq == 1
    b.unlock(r, lvb=b"reader cannot write")          # PR holders never write
    w = b.lock("W", PW)
    b.convert(w, EX)
    (g,) = b.take()[1:]
    assert isinstance(g, Granted) and g.lvb is not None and g.lvb.startswith(b"one")  # PW->EX
    b.convert(w, PR, lvb=b"two")                       # EX down-conversion writes
    (g,) = b.take()
    assert isinstance(g, Granted) and g.lvb is None   # a down-conversion does not read
    assert b.engine.snapshot()["domains"][0]["resources"][0]["lvb"]["seq"] == 2
    b.convert(w, EX)
    b.unlock(w, flags=Flag.IVVALBLK)
    b.take()
    b.lock("Z", NL)
    (g,) = b.take()
    assert isinstance(g, Granted) and not g.lvb_valid and g.lvb_seq == 2


def test_dead_ex_holder_invalidates_value_block_and_hands_over() -> None:
    b = Bench()
    a = b.lock("A", EX)
    b.unlock(a, lvb=b"counter=1")
    a = b.lock("A", EX)
    w = b.lock("W", EX)
    b.take()
    b.gone("A")
    (g,) = b.take()
    assert isinstance(g, Granted) and g.lkid == w and not g.lvb_valid
    b.unlock(w, lvb=b"repaired")
    r = b.lock("R", PR)
    (g,) = b.take()
    assert isinstance(g, Granted) and g.lvb_valid and g.lvb_seq == 2
    del r


def test_dead_pr_holder_leaves_value_block_valid() -> None:
    b = Bench()
    b.lock("A", PR)
    w = b.lock("W", EX)
    b.take()
    b.gone("A")
    (g,) = b.take()
    assert isinstance(g, Granted) and g.lkid == w and g.lvb_valid


def test_tokens_strictly_increase_on_every_grant() -> None:
    b = Bench()
    seen: list[int] = []
    for _ in range(5):
        a = b.lock("A", EX)
        b.convert(a, PR)
        b.convert(a, EX)
        b.unlock(a)
        seen += [e.token for e in b.take() if isinstance(e, Granted)]
    b.engine.drop("d", "r")
    b.lock("A", EX)                       # the resource is new, the counter is not
    seen += [e.token for e in b.take() if isinstance(e, Granted)]
    assert len(seen) == 16 and seen == sorted(set(seen))


def test_persistent_lock_becomes_orphan_then_purged() -> None:
    b = Bench()
    p = b.lock("A", EX, Flag.PERSISTENT)
    n = b.lock("A", PR, name="other")
    w = b.lock("W", PR)
    b.take()
    b.gone("A")
    assert b.take() == []                                   # the orphan still holds EX
    assert b.engine.state(p).owner is None and b.engine.state(p).orphan_of == "A"
    with pytest.raises(DlmError):
        b.engine.state(n)                                   # not persistent: released
    with pytest.raises(DlmError) as err:
        b.unlock(p)
    assert err.value.errno == errno.EPERM
    count, events = b.engine.purge(dead_owner=lambda owner: owner == "nobody")
    assert count == 0
    count, events = b.engine.purge(domain="d")
    assert count == 1
    (g,) = events
    assert isinstance(g, Granted) and g.lkid == w and not g.lvb_valid


def test_orphan_adoption() -> None:
    b = Bench()
    p = b.lock("A", PW, Flag.PERSISTENT)
    b.gone("A")
    b.take()
    with pytest.raises(DlmError) as err:
        b.lock("B", EX, Flag.ORPHAN)
    assert err.value.errno == errno.ENOENT
    assert b.lock("B", PW, Flag.ORPHAN) == p
    (g,) = b.take()
    assert isinstance(g, Granted) and g.owner == "B" and g.token > 0
    b.gone("B")
    assert b.engine.state(p).orphan_of == "B"


def test_pending_conversion_of_persistent_lock_cancelled_on_death() -> None:
    b = Bench()
    p = b.lock("A", PR, Flag.PERSISTENT)
    c = b.lock("C", PR)
    b.convert(p, EX)
    b.gone("A")
    assert b.mode(p) == PR and b.engine.state(p).rqmode is None
    assert b.queues() == ([c, p], [], [])


def test_domains_live_while_they_have_members_or_locks() -> None:
    e = Engine()
    e.join("A", "d")
    lkid, _ = e.request("B", "d", "r", EX)
    e.unlock(lkid, lvb=b"kept")
    e.owner_gone("B")
    assert e.domains() == ["d"]                      # A is still a member: the LVB lives
    lkid, events = e.request("C", "d", "r", PR)
    assert isinstance(events[0], Granted) and events[0].lvb == b"kept".ljust(LVB_LEN, b"\0")
    with pytest.raises(DlmError) as err:
        e.drop("d", "r")
    assert err.value.errno == errno.EBUSY
    e.unlock(lkid)
    e.drop("d", "r")
    e.leave("A", "d")
    e.owner_gone("C")
    assert e.domains() == []


@pytest.mark.parametrize("name", ["", "x" * 65, "a\0b"])
def test_name_limits(name: str) -> None:
    with pytest.raises(DlmError) as err:
        Engine().request("A", "d", name, EX)
    assert err.value.errno == errno.EINVAL


# -- a model check: random operations never break the two invariants -----------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["lock", "convert", "unlock", "cancel", "gone", "purge"]),
              st.integers(0, 3), st.sampled_from(list(Mode)),
              st.sampled_from([Flag.NONE, Flag.NOQUEUE, Flag.QUECVT, Flag.CONVDEADLK,
                               Flag.PERSISTENT])),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_random_histories_keep_safety_and_progress(ops: list[tuple[str, int, Mode, Flag]]
                                                   ) -> None:
    e = Engine()
    mine: dict[int, list[int]] = {i: [] for i in range(4)}
    for op, who, mode, flags in ops:
        owner = f"o{who}"
        try:
            if op == "lock":
                lkid, _ = e.request(owner, "d", "r", mode, flags)
                mine[who].append(lkid)
            elif op in ("convert", "unlock", "cancel") and mine[who]:
                lkid = mine[who][-1]
                if op == "convert":
                    e.convert(lkid, mode, flags & ~Flag.PERSISTENT)
                elif op == "unlock":
                    e.unlock(lkid)
                    mine[who].pop()
                else:
                    e.cancel(lkid)
                    if e.state(lkid).grmode is None:
                        mine[who].pop()
            elif op == "gone":
                e.owner_gone(owner)
                mine[who] = []
            elif op == "purge":
                e.purge()
        except DlmError:
            pass
        mine = {w: [lk for lk in ids if _exists(e, lk)] for w, ids in mine.items()}
        for dom in e.snapshot()["domains"]:
            for res in dom["resources"]:
                holders = res["granted"] + res["converting"]
                modes = [Mode[h["grmode"]] for h in holders]
                for x, y in itertools.combinations(modes, 2):
                    assert compatible(x, y), res           # safety
                for queue in ("converting", "waiting"):
                    if res[queue] and (queue == "converting" or not res["converting"]):
                        head = res[queue][0]
                        others = [Mode[h["grmode"]] for h in holders
                                  if h["lkid"] != head["lkid"]]
                        want = Mode[head["rqmode"]]
                        assert not all(compatible(m, want) for m in others), res  # progress


def _exists(e: Engine, lkid: int) -> bool:
    try:
        e.state(lkid)
    except DlmError:
        return False
    return True


def test_listing_resumes_where_it_stopped_whatever_changed_meanwhile() -> None:
    """Pages of a listing, with resources created and dropped between them: every resource
    that was there all along is listed exactly once, in order, with all its locks."""
    e = Engine()
    kept = [f"r{i:05}" for i in range(0, 3000, 2)]
    for name in kept:
        e.request("o", "d", name, Mode.PR)
        e.request("x", "d", name, Mode.PR)
        e.request("o", "d", name + "z", Mode.NL)  # dropped later, some before it is listed
    e.request("o", "a", "only", Mode.EX)
    listed: list[tuple[str, str, int]] = []
    after = None
    step = 0
    while True:
        page = list(itertools.islice(e.listing(after), 97))
        if not page:
            break
        listed += [pos for pos, kind, _ in page if kind == "granted"]
        after = page[-1][0]
        step += 1
        e.request("n", "d", f"{kept[step * 37 % len(kept)]}x", Mode.NL)  # a new name
        victim = f"{kept[step * 53 % len(kept)]}z"
        lkid = next((lk for lk, state in e._locks.items()
                     if state.resource.name == victim), None)
        if lkid is not None:
            e.unlock(lkid)
            e.drop("d", victim)
    assert listed[0] == ("a", "only", 1)
    assert [pos for pos in listed if pos[1] in set(kept)] == [
        ("d", name, n) for name in kept for n in (1, 2)]
