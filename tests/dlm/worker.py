"""Worker processes for the multi-process lock tests (run as a script, one role per call).

    worker.py history URL OUT SEED ROUNDS   take random modes on a few resources, log intervals
    worker.py counter URL ROUNDS            lock EX, LVB counter += 1, unlock; ROUNDS times
    worker.py hold URL MODE [persistent]    take a lock, print "held", then sleep forever
    worker.py fscounter FILE ROUNDS         the counter through dlmfs: open O_RDWR, read, write
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import anyio

from minidisk.dlm.client import connect
from minidisk.dlm.modes import Mode

RESOURCES = ["r0", "r1", "r2"]


async def history(url: str, out: str, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    log: list[tuple[str, str, float, float]] = []
    async with connect(url, name=f"history{seed}") as client:
        for _ in range(rounds):
            name = rng.choice(RESOURCES)
            mode = rng.choice(list(Mode))
            lock = client.lock("h", name, mode)
            assert await lock.acquire()
            granted = time.monotonic()        # after the grant arrived...
            await anyio.sleep(rng.random() * 0.003)
            released = time.monotonic()       # ...and before the unlock leaves
            await lock.release()
            log.append((name, mode.name, granted, released))
    with open(out, "w") as f:
        json.dump(log, f)


def read_counter(data: bytes) -> int:
    text = data.rstrip(b"\0")
    return int(text) if text else 0


async def counter(url: str, rounds: int) -> None:
    async with connect(url, name="counter") as client:
        lock = client.lock("c", "counter", Mode.EX)
        for _ in range(rounds):
            assert await lock.acquire()
            assert lock.lvb_valid
            lock.write_lvb(str(read_counter(lock.lvb) + 1).encode().ljust(20, b"\0"))
            await lock.release()


async def hold(url: str, mode: str, persistent: bool) -> None:
    async with connect(url, name="holder") as client:
        lock = client.lock("k", "held", Mode.parse(mode), persistent=persistent)
        assert await lock.acquire()
        lock.write_lvb(b"half-written")  # never stored: we die holding the lock
        print("held", lock.token, flush=True)
        await anyio.sleep_forever()


def fscounter(path: str, rounds: int) -> None:
    for _ in range(rounds):
        fd = os.open(path, os.O_RDWR)
        try:
            value = read_counter(os.pread(fd, 64, 0))
            os.pwrite(fd, str(value + 1).encode().ljust(20, b"\0"), 0)
        finally:
            os.close(fd)


def main(argv: list[str]) -> None:
    role = argv[1]
    if role == "history":
        anyio.run(history, argv[2], argv[3], int(argv[4]), int(argv[5]))
    elif role == "counter":
        anyio.run(counter, argv[2], int(argv[3]))
    elif role == "hold":
        anyio.run(hold, argv[2], argv[3], len(argv) > 4)
    elif role == "fscounter":
        fscounter(argv[2], int(argv[3]))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv)
