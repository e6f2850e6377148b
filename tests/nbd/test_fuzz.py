"""The bounded NBD protocol fuzzer (fuzz_engine.py) against a real `minidisk serve`.

MINIDISK_FUZZ_SECONDS sets how long it runs (default 40), MINIDISK_FUZZ_SEED replays a run
(the seed is printed with the summary, pass or fail; `pytest -s` shows it). Each finding
names the session seed that replays it alone: `scripts/fuzz-nbd --session SEED`.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from tests.nbd import fuzz_engine
from tests.nbd.conftest import StartServer
from tests.nbd.nbd_helpers import RawClient

from minidisk.nbd import protocol as p
from minidisk.nbd.malloc_tuning import TRIM_THRESHOLD

SECONDS = float(os.environ.get("MINIDISK_FUZZ_SECONDS", "40"))
SEED = int(os.environ.get("MINIDISK_FUZZ_SEED") or random.randrange(1 << 31))
# What the server may keep after the fuzz connections are gone, beyond what it held before:
# the data written (a memory disk, the blk cache), the freed heap glibc is told to keep for
# request buffers, and some slack; not the payloads of requests that are over (the fuzzer
# announces up to 4 GiB and sends 33 MiB writes and 16 MiB reads).
KEPT_BYTES = (fuzz_engine.EXPORT_SIZE + fuzz_engine.CACHE_SIZE + TRIM_THRESHOLD
              + 32 * 1024 * 1024)


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 180)
def test_fuzz_sessions_with_a_witness(start_server: StartServer, tmp_path: Path) -> None:
    args, targets = fuzz_engine.server_args(tmp_path)
    server = start_server(*args, name="fuzz")
    report = fuzz_engine.run_campaign(server.socket, server.proc.pid, targets, SEED, SECONDS)
    summary = f"MINIDISK_FUZZ_SEED={SEED}\n{report.summary()}"
    print(summary)
    assert report.server_alive, f"the server died\n{summary}\n{server.log_text()[-4000:]}"
    assert not report.findings, summary
    assert report.witness["error"] is None, summary
    assert report.witness["reads"] > 0, summary
    assert report.fds[1] <= report.fds[0], f"the server kept descriptors\n{summary}"
    kept_kib = report.rss_kib[1] - report.rss_kib[0]
    assert kept_kib <= KEPT_BYTES // 1024, f"the server kept memory\n{summary}"


@pytest.mark.timeout(120)
def test_dropped_partial_writes_give_their_payload_budget_back(start_server: StartServer
                                                               ) -> None:
    """The fuzzer's first finding on 54d831b (a whole-server stall after ~20 s, seed 202 with
    3 workers), reduced: a WRITE whose payload never comes takes its length from the
    server's payload budget, and its connection going away must give it back. 40 such
    connections of 16 MiB each are more than the 512 MiB server budget."""
    server = start_server("--memory", "mem=16M")
    for _ in range(40):
        with RawClient(server.socket) as client:
            client.handshake()
            client.go("mem", structured=False)
            client.send(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 16 << 20)
                        + b"x")
    with RawClient(server.socket) as client:
        client.handshake()
        client.go("mem", structured=False)
        assert client.read(0, 512) == bytes(512)
