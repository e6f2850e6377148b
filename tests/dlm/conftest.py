"""Fixtures for the lock manager: a `minidisk dlm serve` process on its own socket, and a
dlmfs mount on its own directory, both started by tests/harness.py and always torn down."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests import harness
from tests.harness import MINIDISK

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "worker.py")


@dataclass(eq=False)
class Server(harness.Server):
    """A `minidisk dlm serve` process."""

    @property
    def path(self) -> str:
        return self.socket

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.proc


@dataclass
class Mount:
    path: Path
    server: Server
    process: subprocess.Popen[bytes] | subprocess.Popen[str]


def _listening(process: harness.Process) -> bool:
    # The line `dlm serve` prints once it listens: a probe connection would be a client of
    # its own, counted against --max-clients until the server notices it has gone.
    return any(line.startswith("listening on") for line in process.log_text().splitlines())


def dlm_cli(server: Server, *args: str) -> str:
    """`minidisk dlm ARGS --server URL`'s output; it must succeed."""
    return subprocess.run([MINIDISK, "dlm", *args, "--server", server.url], check=True,
                          capture_output=True, text=True, timeout=harness.scaled(60)).stdout


@contextlib.contextmanager
def serving(path: str, *options: str, env: Mapping[str, str] | None = None
            ) -> Iterator[Server]:
    """`minidisk dlm serve unix://PATH OPTIONS...` once it listens (its log PATH.log);
    stopped afterwards."""
    started = harness.start([MINIDISK, "dlm", "serve", "-f", f"unix://{path}", *options],
                            Path(path).with_suffix(".log"), _listening, env=env)
    server = Server(started.proc, started.log, path)
    try:
        yield server
    finally:
        server.stop(5)


@pytest.fixture
def dlm_server(short_tmp: Path) -> Iterator[Server]:
    with serving(str(short_tmp / "dlm.sock")) as server:
        yield server


@pytest.fixture
def dlmfs(dlm_server: Server, short_tmp: Path) -> Iterator[Mount]:
    mnt = short_tmp / "mnt"
    mnt.mkdir()
    mount = harness.mount_dlmfs(mnt, dlm_server.url, "--wait-limit", "2",
                                log=short_tmp / "dlmfs.log")
    try:
        yield Mount(mnt, dlm_server, mount.proc)
    finally:
        harness.unmount_fuse(mnt, mount)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Client tests run on both loops: the daemon uses asyncio, dlmfs uses trio."""
    return str(request.param)
