"""A multi-process history across two dlmfs mounts (two nodes), checked.

Three processes per mount open one lock file again and again -- PR or EX, blocking or trylock
(O_NONBLOCK) -- read its value block, write a value of their own under EX, hold a moment and
close. Each logs when it invoked and when each call returned, from CLOCK_MONOTONIC (one clock
for every process of the machine). `check` then proves from the log alone:

* mutual exclusion between nodes: no EX hold overlaps another node's hold (PR or EX), while
  PR beside PR on another node is allowed;
* sharing within a node, as dlmfs's spec has it (the mount caches one lock for all its
  processes): holds on one node do overlap, EX ones included;
* the value block as a register: every value read was written (or is the initial empty one),
  not after the read ended, and no other write came wholly between that write and the read.

A hold is counted from the open's return to the close's call: the lock is surely the
process's then (FUSE's RELEASE after close only makes a hold longer, never overlaps shorter).
The checker is itself checked on forged histories: one hold moved over another node's, and
one read given an overwritten value; each must be found. On `--exclusive` mounts the same run
must show no EX hold beside another on its own node either (the default mounts' run shows
hundreds). No timing is asserted.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from . import test_dlmfs
from .conftest import Mount, Server
from .test_dlmfs import mounted

nodes = test_dlmfs.nodes  # two mounts (nodes A and B), each with domain "dom"

pytestmark = [pytest.mark.timeout(120)]

SECONDS = 3.0  # each process's run
PROCESSES = 3  # per node

WORKER = r"""
import errno, json, os, random, sys, time
path, node, proc, seconds, seed, log = sys.argv[1:]
proc, seconds = int(proc), float(seconds)
rng = random.Random(int(seed))
now = time.monotonic_ns
out = []
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    n += 1
    ex = rng.random() < 0.5
    trylock = rng.random() < 0.3
    flags = (os.O_RDWR if ex else os.O_RDONLY) | (os.O_NONBLOCK if trylock else 0)
    op = {"node": node, "proc": proc, "ex": ex, "try": trylock, "invoke": now()}
    try:
        fd = os.open(path, flags)
    except OSError as err:
        op["errno"] = err.errno
        op["failed"] = now()
        out.append(op)
        continue
    op["ok"] = now()
    op["read_invoke"] = now()
    op["read"] = os.pread(fd, 64, 0).rstrip(b"\0").decode().strip()
    op["read_done"] = now()
    if ex:
        value = f"{node}{proc}-{n}".ljust(16)
        op["write_invoke"] = now()
        os.pwrite(fd, value.encode(), 0)
        op["write_done"] = now()
        op["write"] = value.strip()
    time.sleep(rng.random() * 0.004)
    op["close_invoke"] = now()
    os.close(fd)
    op["closed"] = now()
    out.append(op)
with open(log, "w") as f:
    for op in out:
        f.write(json.dumps(op) + "\n")
"""


@dataclass(frozen=True)
class Hold:
    node: str
    proc: int
    ex: bool
    start: int  # open returned
    end: int  # close invoked


@dataclass(frozen=True)
class Write:
    value: str
    invoke: int
    done: int


@dataclass(frozen=True)
class Read:
    node: str
    value: str
    invoke: int
    done: int


@dataclass
class History:
    holds: list[Hold]
    writes: list[Write]
    reads: list[Read]
    failed_trylocks: int = 0


def load(logs: list[Path]) -> History:
    history = History([], [], [])
    for log in logs:
        for line in log.read_text().splitlines():
            op = json.loads(line)
            if "ok" not in op:
                assert op["try"] and op["errno"] == errno.ETXTBSY, op  # only trylocks fail
                history.failed_trylocks += 1
                continue
            history.holds.append(Hold(op["node"], op["proc"], op["ex"], op["ok"],
                                      op["close_invoke"]))
            history.reads.append(Read(op["node"], op["read"], op["read_invoke"],
                                      op["read_done"]))
            if op["ex"]:
                history.writes.append(Write(op["write"], op["write_invoke"], op["write_done"]))
    return history


@dataclass
class Verdict:
    node_conflicts: list[tuple[Hold, Hold]]
    bad_reads: list[tuple[Read, str]]
    same_node_overlaps: int  # pairs of overlapping holds on one node with an EX among them
    cross_node_pr_overlaps: int


def check(history: History) -> Verdict:
    verdict = Verdict([], [], 0, 0)
    active: list[Hold] = []
    for hold in sorted(history.holds, key=lambda h: h.start):
        active = [h for h in active if h.end > hold.start]
        for other in active:
            if other.node != hold.node and (other.ex or hold.ex):
                verdict.node_conflicts.append((other, hold))
            elif other.node != hold.node:
                verdict.cross_node_pr_overlaps += 1
            elif other.ex or hold.ex:
                verdict.same_node_overlaps += 1
        active.append(hold)
    # The value block as a register whose every written value is unique.
    by_value = {w.value: w for w in history.writes}
    assert len(by_value) == len(history.writes), "written values must be unique"
    writes = sorted(history.writes, key=lambda w: w.done)
    dones = [w.done for w in writes]
    latest_invoke: list[int] = []  # over the writes done so far: the latest a write was invoked
    for w in writes:
        latest_invoke.append(max(w.invoke, latest_invoke[-1] if latest_invoke else 0))
    for read in history.reads:
        # The writes done before this read was invoked: the latest invoked among them.
        before = bisect.bisect_left(dones, read.invoke)
        newest = latest_invoke[before - 1] if before else None
        if read.value == "":
            if newest is not None:
                verdict.bad_reads.append((read, "the initial value after a write"))
            continue
        write = by_value.get(read.value)
        if write is None:
            verdict.bad_reads.append((read, "never written"))
        elif write.invoke > read.done:
            verdict.bad_reads.append((read, "written after the read"))
        elif newest is not None and newest > write.done:
            verdict.bad_reads.append((read, "overwritten before the read"))
    return verdict


def run_history(nodes: tuple[Mount, Mount], logs: Path) -> History:
    for mount in nodes:
        os.close(os.open(mount.path / "dom" / "lk", os.O_CREAT | os.O_RDONLY))
    workers = []
    for mount, node in zip(nodes, "ab", strict=True):
        for proc in range(PROCESSES):
            log = logs / f"{node}{proc}.jsonl"
            workers.append((log, subprocess.Popen(
                [sys.executable, "-c", WORKER, str(mount.path / "dom" / "lk"), node, str(proc),
                 str(SECONDS), str(ord(node) * 10 + proc), str(log)])))
    for _log, worker in workers:
        assert worker.wait(60) == 0
    return load([log for log, _worker in workers])


def test_two_nodes_exclude_each_other_and_share_within(nodes: tuple[Mount, Mount],
                                                       tmp_path: Path) -> None:
    history = run_history(nodes, tmp_path)
    verdict = check(history)
    print(f"{len(history.holds)} holds ({sum(h.ex for h in history.holds)} EX),"
          f" {history.failed_trylocks} trylocks refused; overlaps: {verdict.same_node_overlaps}"
          f" on one node with EX, {verdict.cross_node_pr_overlaps} PR beside PR across nodes")
    assert len(history.holds) > 50, "too few holds to say anything"
    assert verdict.node_conflicts == []
    assert verdict.bad_reads == []
    # The spec's node-level caching: processes of one mount held the lock together.
    assert verdict.same_node_overlaps > 0
    # The forged variants are judged on this very history.
    forged_overlap(history)
    forged_stale_read(history)


def test_exclusive_mounts_exclude_within_a_node_too(dlm_server: Server, short_tmp: Path,
                                                     tmp_path: Path) -> None:
    """`--exclusive` (our extension): the same history, and no EX hold beside any other hold
    on its own node either."""
    with mounted(dlm_server, short_tmp / "a", "--exclusive") as a, \
            mounted(dlm_server, short_tmp / "b", "--exclusive") as b:
        for mount in (a, b):
            (mount.path / "dom").mkdir()
        history = run_history((a, b), tmp_path)
    verdict = check(history)
    assert len(history.holds) > 50, "too few holds to say anything"
    assert verdict.node_conflicts == []
    assert verdict.bad_reads == []
    assert verdict.same_node_overlaps == 0


def forged_overlap(history: History) -> None:
    """Move one EX hold of node a onto a hold of node b: the checker must see it."""
    ex = next(h for h in history.holds if h.ex and h.node == "a")
    b = next(h for h in history.holds if h.node == "b")
    moved = replace(ex, start=b.start, end=b.end)
    forged = History([h for h in history.holds if h is not ex] + [moved], history.writes,
                     history.reads)
    conflicts = check(forged).node_conflicts
    assert conflicts and all(moved in pair for pair in conflicts)


def forged_stale_read(history: History) -> None:
    """Give the last read the first value written: the checker must see it."""
    stale = min(history.writes, key=lambda w: w.done)
    read = max(history.reads, key=lambda r: r.invoke)
    forged = History(history.holds, history.writes,
                     [r for r in history.reads if r is not read] + [replace(read,
                                                                           value=stale.value)])
    assert [why for _read, why in check(forged).bad_reads] == ["overwritten before the read"]


def test_the_checker_on_hand_made_histories() -> None:
    """Small histories whose verdicts are known: PR beside PR across nodes is fine, EX beside
    anything across nodes is not; EX beside EX on one node is sharing; reads."""
    holds = [Hold("a", 0, False, 0, 10), Hold("b", 0, False, 5, 15),
             Hold("a", 1, True, 20, 30), Hold("a", 2, True, 25, 35)]
    writes = [Write("x", 21, 22), Write("y", 26, 27)]
    reads = [Read("a", "", 1, 2), Read("b", "", 6, 7), Read("a", "x", 23, 24),
             Read("a", "y", 28, 29)]
    verdict = check(History(holds, writes, reads))
    assert verdict.node_conflicts == [] and verdict.bad_reads == []
    assert verdict.cross_node_pr_overlaps == 1 and verdict.same_node_overlaps == 1
    late = Hold("b", 1, True, 34, 40)
    assert check(History([*holds, late], writes, reads)).node_conflicts == [(holds[3], late)]
    wrong = [Read("b", "x", 40, 41), Read("b", "z", 42, 43), Read("b", "", 44, 45),
             Read("b", "y", 10, 11)]
    assert [why for _r, why in check(History(holds, writes, wrong)).bad_reads] == [
        "overwritten before the read", "never written", "the initial value after a write",
        "written after the read"]
