"""Crash consistency: kill -9 the server in the middle of a write workload, restart it on the
same host files, and every write acknowledged before a completed FLUSH reads back.

For each backend — a `blk` key (write-back cache) over a host file, a `reg` key, and a dm
linear table over two host files (re-created on restart from its table file) — a raw-socket
client pipelines whole-block writes (never two in flight to one block; some with FUA) with a
FLUSH every few writes, while a timer kills the server at a random point. The model, per
block: `durable` is the newest write acknowledged before a FLUSH was sent that then completed,
or acknowledged with FUA. After the restart a
block must hold exactly the value of one write to it that is not older than `durable` (each
value names its block and sequence number, and the rest of it is derived from both), or
zeroes while nothing is durable there. What it holds becomes the new durable value.

MINIDISK_CRASH_SEED replays the kill points and the workload's choices; MINIDISK_CRASH_KILLS
sets the kills per backend (default 7: 21 in all).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests import harness
from tests.nbd.nbd_helpers import Closed, RawClient, Reply

from minidisk.nbd import protocol as p

SEED = int(os.environ.get("MINIDISK_CRASH_SEED") or random.randrange(1 << 31))
KILLS = int(os.environ.get("MINIDISK_CRASH_KILLS", "7"))
BLOCK = 4096
BLOCKS = 256  # 1 MiB
QUEUE_DEPTH = 16
FLUSH_EVERY = 12  # writes between FLUSHes
FUA_SHARE = 0.1  # writes sent with FUA: durable when acknowledged
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Backend:
    name: str
    export: str

    def setup(self, directory: Path) -> list[str]:
        """Create the host files (first run only) and return the serve options."""
        size = BLOCKS * BLOCK
        if self.name == "blk":
            _host_file(directory / "blk.img", size)
            # A cache larger than the device: dirty lines reach the file only by FLUSH.
            return ["-r", str(2 * size),
                    "-d", f"key=/blk,hostpath={directory / 'blk.img'},size={size},type=blk"]
        if self.name == "reg":
            _host_file(directory / "reg.img", size)
            return ["-d", f"key=/reg,hostpath={directory / 'reg.img'},type=reg"]
        half = size // 2
        _host_file(directory / "a.img", half)
        _host_file(directory / "b.img", half)
        sectors = half // 512
        (directory / "lin.table").write_text(
            f"0 {sectors} linear /a 0\n{sectors} {sectors} linear /b 0\n")
        return ["--file", f"a={directory / 'a.img'}", "--file", f"b={directory / 'b.img'}",
                "--table", f"lin={directory / 'lin.table'}"]


BACKENDS = [Backend("blk", "blk"), Backend("reg", "reg"), Backend("dm-linear", "dev/mapper/lin")]


def _host_file(path: Path, size: int) -> None:
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size)


def block_value(block: int, seq: int) -> bytes:
    """What write `seq` puts in `block`: its identity, then bytes derived from it."""
    if seq == 0:
        return bytes(BLOCK)
    head = struct.pack(">QQ", block, seq)
    digest = hashlib.blake2b(head).digest()
    return head + (digest * (BLOCK // len(digest)))[:BLOCK - len(head)]


def decode(block: int, data: bytes) -> int | None:
    """The sequence number of the write whose value `data` is, None if it is no such value."""
    if data == bytes(BLOCK):
        return 0
    got_block, seq = struct.unpack_from(">QQ", data)
    if got_block != block or data != block_value(block, seq):
        return None
    return int(seq)


@dataclass
class Model:
    durable: list[int] = field(default_factory=lambda: [0] * BLOCKS)
    written: list[set[int]] = field(default_factory=lambda: [{0} for _ in range(BLOCKS)])
    next_seq: int = 1
    flushed: set[int] = field(default_factory=set)  # blocks a FLUSH made durable this round
    durable_checks: int = 0  # such blocks checked after a restart


class ServerProcess:
    """`minidisk serve -s` that the test kills and restarts on the same files, one log for
    all its runs (harness.serve)."""

    def __init__(self, directory: Path, args: list[str]) -> None:
        self.directory = directory
        self.args = args
        self.socket = str(directory / "s.sock")
        self.server: harness.Server | None = None

    def start(self) -> None:
        self.server = harness.serve(self.directory, *self.args, append=True,
                                    timeout=START_TIMEOUT)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.server is not None
        return self.server.proc

    def kill(self) -> None:
        assert self.server is not None
        self.server.kill()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def workload(client: RawClient, rng: random.Random, model: Model) -> int:
    """Pipelined writes and FLUSHes until the server goes away; the writes sent."""
    inflight: dict[int, tuple[int, int, bool]] = {}  # cookie -> (block, seq, fua) of a WRITE
    flushes: dict[int, dict[int, int]] = {}  # cookie -> newest acked seq per block
    acked: dict[int, int] = {}  # block -> newest acknowledged seq since the last flush sent
    busy: set[int] = set()
    cookies = iter(range(1, 1 << 62))
    sent = since_flush = 0
    replies: dict[int, Reply] = {}
    try:
        while True:
            while len(inflight) + len(flushes) < QUEUE_DEPTH:
                if since_flush >= FLUSH_EVERY:
                    cookie = next(cookies)
                    client.send_request(p.CMD_FLUSH, cookie)
                    flushes[cookie], acked = acked, {}
                    since_flush = 0
                    continue
                block = rng.randrange(BLOCKS // 4) if rng.random() < 0.5 else \
                    rng.randrange(BLOCKS)  # a hot quarter, so blocks are overwritten
                if block in busy:
                    break
                seq = model.next_seq
                model.next_seq += 1
                model.written[block].add(seq)
                cookie = next(cookies)
                fua = rng.random() < FUA_SHARE
                client.send_request(p.CMD_WRITE, cookie, block * BLOCK, BLOCK,
                                    flags=p.CMD_FLAG_FUA if fua else 0,
                                    payload=block_value(block, seq))
                inflight[cookie] = (block, seq, fua)
                busy.add(block)
                sent += 1
                since_flush += 1
            cookie_done = client.read_message(replies)
            if cookie_done is None:
                continue
            reply = replies.pop(cookie_done)
            assert reply.error == 0, f"request {cookie_done} failed: {reply}"
            if cookie_done in inflight:
                block, seq, fua = inflight.pop(cookie_done)
                busy.discard(block)
                acked[block] = seq
                if fua:  # durable once acknowledged
                    model.durable[block] = max(model.durable[block], seq)
                    model.flushed.add(block)
            else:
                for block, seq in flushes.pop(cookie_done).items():
                    model.durable[block] = max(model.durable[block], seq)
                    model.flushed.add(block)
    except (Closed, OSError):
        return sent


def verify(server: ServerProcess, export: str, model: Model) -> list[str]:
    """Check every block against the model; what it now holds becomes durable."""
    errors = []
    with RawClient(server.socket) as client:
        client.handshake()
        client.go(export, structured=False)
        data = b"".join(client.read(offset, 64 * BLOCK)
                        for offset in range(0, BLOCKS * BLOCK, 64 * BLOCK))
    model.durable_checks += len(model.flushed)
    model.flushed.clear()
    for block in range(BLOCKS):
        seq = decode(block, data[block * BLOCK:(block + 1) * BLOCK])
        if seq is None or seq not in model.written[block]:
            errors.append(f"block {block}: holds no value ever written to it")
        elif seq < model.durable[block]:
            errors.append(f"block {block}: write {seq} is older than flushed write "
                          f"{model.durable[block]}")
        else:
            model.durable[block] = seq
            model.written[block] = {s for s in model.written[block] if s >= seq}
    return errors


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS, ids=[b.name for b in BACKENDS])
def test_flushed_writes_survive_kill_9(backend: Backend, short_tmp: Path) -> None:
    seed = SEED + BACKENDS.index(backend)
    rng = random.Random(seed)
    server = ServerProcess(short_tmp, backend.setup(short_tmp))
    model = Model()
    total_writes = 0
    try:
        server.start()
        for kill in range(KILLS):
            delay = rng.uniform(0.05, 0.8)
            with RawClient(server.socket) as client:
                client.handshake()
                client.go(backend.export, structured=False)
                timer = threading.Timer(delay, server.proc.send_signal, (signal.SIGKILL,))
                timer.start()
                try:
                    total_writes += workload(client, rng, model)
                finally:
                    timer.cancel()
            server.kill()
            server.start()
            errors = verify(server, backend.export, model)
            assert not errors, (f"MINIDISK_CRASH_SEED={SEED}: {backend.name}, kill {kill + 1} "
                                f"after {delay:.2f} s:\n" + "\n".join(errors[:20]))
    finally:
        server.stop()
    print(f"MINIDISK_CRASH_SEED={SEED} {backend.name}: {KILLS} kills, {total_writes} writes, "
          f"{model.durable_checks} flushed blocks checked")
    assert model.durable_checks > 0, "no FLUSH completed before a kill: the test proved nothing"
