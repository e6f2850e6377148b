"""BUSE-style user classes served over NBD and checked with real clients."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests import harness
from tests.harness import SYSTEM_PYTHON, nbdinfo_json

from minidisk.device.adapter import from_object

ServeScript = Callable[[str], str]


@pytest.fixture
def serve_script(short_tmp: Path) -> Iterator[ServeScript]:
    """serve_script(source): run `source` (defining a class Disk) with serve_object(Disk())
    on a unix socket; the URI of its export `disk`."""
    procs: list[harness.Process] = []

    def start(source: str) -> str:
        sock = short_tmp / f"u{len(procs)}.sock"
        script = short_tmp / f"disk{len(procs)}.py"
        script.write_text(textwrap.dedent(source) + textwrap.dedent(f"""
            from minidisk import serve_object
            serve_object(Disk(), "unix://{sock}", name="disk")
        """))
        procs.append(harness.start([sys.executable, str(script)], sock.with_suffix(".log"),
                                   harness.accepting(sock)))
        return f"nbd+unix:///disk?socket={sock}"

    yield start
    for proc in procs:
        proc.stop()


def test_capabilities_follow_the_class() -> None:
    class ReadOnly:
        size = 4096

        def read(self, offset: int, length: int) -> bytes:
            return bytes(length)

    class Full(ReadOnly):
        def write(self, offset: int, data: memoryview) -> None: ...
        def flush(self) -> None: ...
        def trim(self, offset: int, length: int) -> None: ...

    ro, full = from_object(ReadOnly()).caps, from_object(Full()).caps
    assert ro.read_only and not ro.flush and not ro.trim
    assert not full.read_only and full.flush and full.fua and full.trim
    assert not full.fast_zero  # no zero method: zeroing is emulated, so never "fast"


def test_sync_class_advertises_only_what_it_has(serve_script: ServeScript) -> None:
    uri = serve_script("""
        class Disk:
            size = 1 << 20
            def __init__(self):
                self.data = bytearray(self.size)
            def read(self, offset, length):
                return self.data[offset:offset + length]
            def write(self, offset, data):
                self.data[offset:offset + len(data)] = data
    """)
    info = nbdinfo_json(uri)["exports"][0]
    assert info["can_flush"] is False and info["can_trim"] is False
    assert info["can_zero"] is True and info["is_read_only"] is False
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 512 4k",
                    "-c", "read -P 0x33 512 4k", "-c", "write -z 512 1k",
                    "-c", "read -P 0 512 1k", uri], check=True, capture_output=True)


def test_async_class_and_errno_mapping(serve_script: ServeScript) -> None:
    uri = serve_script("""
        import asyncio, errno
        class Disk:
            size = 1 << 20
            async def read(self, offset, length):
                await asyncio.sleep(0.001)
                if offset >= 512 * 1024:
                    raise OSError(errno.EILSEQ, "bad sector")
                return bytes(length)
            async def write(self, offset, data):
                if offset == 0:
                    raise OSError(errno.EROFS, "sector 0 is protected")
                if offset == 4096:
                    raise OSError(errno.EDQUOT, "quota")
            async def flush(self):
                pass
    """)
    script = textwrap.dedent("""
        import nbd, sys, errno
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        out = []
        for op in (lambda: h.pread(512, 600 * 1024), lambda: h.pwrite(b"x" * 512, 0),
                   lambda: h.pwrite(b"x" * 512, 4096), lambda: h.pread(512, 0),
                   lambda: h.flush()):
            try:
                op()
                out.append(0)
            except nbd.Error as e:
                out.append(e.errno)
        print(out)
    """)
    done = subprocess.run([SYSTEM_PYTHON, "-c", script, uri], capture_output=True, text=True,
                          check=True)
    # EILSEQ -> EIO, EROFS -> EPERM, EDQUOT -> ENOSPC; the stream stays in sync afterwards.
    # (libnbd reports errno names.)
    assert done.stdout.strip() == str(["EIO", "EPERM", "ENOSPC", 0, 0])


def test_ramdisk_example(short_tmp: Path) -> None:
    sock = short_tmp / "ram.sock"
    proc = harness.start([sys.executable, "-m", "minidisk.examples.ramdisk", f"unix://{sock}"],
                         short_tmp / "ram.log", harness.accepting(sock))
    try:
        uri = f"nbd+unix:///ramdisk?socket={sock}"
        info = nbdinfo_json(uri)["exports"][0]
        assert info["export-size"] == 128 << 20
        assert info["can_flush"] and info["can_trim"]
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c",
                        "read -P 0x5a 1M 64k", "-c", "discard 1M 64k", "-c",
                        "read -P 0 1M 64k", uri], check=True, capture_output=True)
    finally:
        status = proc.stop()
    assert status == 0, proc.log_text()  # SIGTERM is a clean shutdown
    assert not sock.exists()  # removed before it exited
