"""Real clients against `minidisk serve`: nbdinfo, nbdcopy, qemu-io, qemu-img, fio, and
socket activation (`nbdinfo -- [ minidisk serve ... ]`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.harness import MINIDISK
from tests.nbd.conftest import StartServer

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def run(*argv: str, timeout: float = 90) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patterned_image(path: Path, size: int) -> None:
    """Data, holes and zeroes mixed, so copies exercise sparse handling too."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(0, size, 3 * MiB):
            f.seek(i)
            f.write(os.urandom(MiB // 2) + bytes(MiB // 4) + b"\x5a" * (MiB // 4))


def test_nbdinfo_json(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=64M", "--memory", "second=1M")
    info = json.loads(run("nbdinfo", "--json", srv.uri("disk")))
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    [export] = info["exports"]
    assert export["export-name"] == "disk" and export["export-size"] == 64 * MiB
    assert export["contexts"] == ["base:allocation"]
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df",
                "can_cache", "can_multi_conn"):
        assert export[cap] is True, cap
    assert export["is_read_only"] is False
    # "" is the first export
    assert json.loads(run("nbdinfo", "--json", srv.uri("")))["exports"][0][
        "export-size"] == 64 * MiB


def test_nbdinfo_list(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=64M", "--memory", "second=1M")
    listing = json.loads(run("nbdinfo", "--json", "--list", srv.uri()))
    assert [(e["export-name"], e["export-size"]) for e in listing["exports"]] == [
        ("disk", 64 * MiB), ("second", MiB)]


def test_nbdinfo_map(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 1M", srv.uri("disk"))
    extents = json.loads(run("nbdinfo", "--json", "--map", srv.uri("disk")))
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, MiB, 3), (MiB, MiB, 0), (2 * MiB, 6 * MiB, 3)]


def test_nbdinfo_read_only(start_server: StartServer) -> None:
    srv = start_server("--read-only", "--memory", "disk=1M")
    export = json.loads(run("nbdinfo", "--json", srv.uri("disk")))["exports"][0]
    assert export["is_read_only"] is True
    assert export["can_trim"] is False and export["can_zero"] is False


@pytest.mark.parametrize("connections", ["1", "4"])
def test_nbdcopy_in_and_out(start_server: StartServer, tmp_path: Path,
                            connections: str) -> None:
    srv = start_server("--memory", "disk=24M")
    source, back = tmp_path / "source.img", tmp_path / "back.img"
    patterned_image(source, 24 * MiB)
    run("nbdcopy", "-C", connections, "--flush", str(source), srv.uri("disk"))
    run("nbdcopy", "-C", connections, srv.uri("disk"), str(back))
    assert sha256(back) == sha256(source)
    # nbdcopy --destination-is-zero skips zeroes; holes must still map as holes.
    extents = json.loads(run("nbdinfo", "--json", "--map", srv.uri("disk")))
    assert any(e["type"] & 2 for e in extents)


def test_socket_activation(tmp_path: Path) -> None:
    source, back = tmp_path / "source.img", tmp_path / "back.img"
    patterned_image(source, 6 * MiB)
    serve = ["[", MINIDISK, "serve", "--memory", "disk=6M", "]"]
    info = json.loads(run("nbdinfo", "--json", "--", *serve))
    assert info["exports"][0]["export-size"] == 6 * MiB
    # A memory disk served this way starts empty and reads back zero.
    run("nbdcopy", "--", *serve, str(back))
    assert back.read_bytes() == bytes(6 * MiB)
    # Copy into a file-backed server started the same way, and check the file.
    target = tmp_path / "target.img"
    target.write_bytes(bytes(6 * MiB))
    run("nbdcopy", str(source), "--", "[", MINIDISK, "serve", "--file", f"disk={target}", "]")
    assert sha256(target) == sha256(source)


def test_stdio_url(tmp_path: Path) -> None:
    """`minidisk serve -` is one connection on stdin/stdout (libnbd connect_command)."""
    from tests.nbd.nbd_helpers import run_libnbd

    result = run_libnbd("""
        h = handle(opt_mode=False)
        h.connect_command([params["minidisk"], "serve", "--memory", "disk=1M", "-"])
        h.pwrite(b"hello", 100)
        result = [h.get_size(), h.pread(5, 100).decode()]
    """, minidisk=MINIDISK)
    assert result == [MiB, "hello"]


def test_qemu_io_patterns(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=16M")
    uri = srv.uri("disk")
    out = run("qemu-io", "-f", "raw",
              "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
              "-c", "write -P 0xcd 1M 64k", "-c", "write -z 1M 32k",
              "-c", "read -P 0 1M 32k", "-c", "read -P 0xcd 1056k 32k",
              "-c", "discard 0 64k", "-c", "write -P 0x12 -f 8M 4k", "-c", "read -P 0x12 8M 4k",
              "-c", "aio_write -P 0x77 2M 512k", "-c", "aio_flush", "-c", "read -P 0x77 2M 512k",
              "-c", "flush", uri)
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    # A wrong expectation must fail, or the check above proves nothing.
    bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 2M 4k", uri],
                         capture_output=True, text=True, timeout=60)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_qemu_img_convert_and_compare(start_server: StartServer, tmp_path: Path) -> None:
    srv = start_server("--memory", "disk=20M")
    uri = srv.uri("disk")
    source, back = tmp_path / "source.img", tmp_path / "back.img"
    patterned_image(source, 20 * MiB)
    run("qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", str(source), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back))
    assert sha256(back) == sha256(source)
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", uri))
    assert info["virtual-size"] == 20 * MiB
    # compare must notice a difference (exit 1)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x99 5M 512", uri)
    differs = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri],
                             capture_output=True, text=True, timeout=60)
    assert differs.returncode == 1, differs.stdout + differs.stderr


def test_qemu_img_map(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 1 2M 1M", srv.uri("disk"))
    mapping = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri("disk")))
    data = [(m["start"], m["length"]) for m in mapping if m["data"]]
    assert data == [(2 * MiB, MiB)]


@pytest.mark.parametrize("rw, bs, depth", [("randwrite", "4k", "32"), ("write", "256k", "4")])
def test_fio_verify(start_server: StartServer, tmp_path: Path, rw: str, bs: str,
                    depth: str) -> None:
    srv = start_server("--memory", "disk=32M")
    out = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri('disk')}",
              f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--size=16M",
              "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--output-format=json",
              "--verify_state_save=0",  # no state file left in the working directory
              f"--filename={tmp_path / 'unused'}")
    result = json.loads(out[out.index("{"):])
    job = result["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 * MiB
    assert job["read"]["io_bytes"] >= 16 * MiB  # the verify pass read everything back


def test_server_survives_clients(start_server: StartServer) -> None:
    """Many short-lived client processes in a row do not leak or kill the server."""
    srv = start_server("--memory", "disk=1M")
    for _ in range(10):
        run("nbdinfo", "--size", srv.uri("disk"))
    assert srv.alive()
    assert srv.stop() == 0


def test_halt(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=1M")
    # halt waits for the server's pid to go away: the server is our child, so reap it
    # while halt waits (a zombie still counts as running).
    halt = subprocess.Popen([MINIDISK, "halt", srv.url])
    assert srv.proc.wait(15) == 0
    assert halt.wait(15) == 0
    assert not os.path.exists(srv.socket)


def test_sigterm_with_clients_connected(start_server: StartServer) -> None:
    """SIGTERM stops the server promptly with clients in the handshake and in transmission;
    the socket file is removed and every client sees the connection close."""
    from tests.nbd.nbd_helpers import RawClient

    srv = start_server("--memory", "disk=1M")
    negotiating = RawClient(srv.socket)
    negotiating.handshake()
    transmitting = RawClient(srv.socket)
    transmitting.handshake()
    transmitting.go("disk")
    try:
        assert srv.stop() == 0
        assert not os.path.exists(srv.socket)
        assert negotiating.is_closed(1) and transmitting.is_closed(1)
    finally:
        negotiating.close()
        transmitting.close()
