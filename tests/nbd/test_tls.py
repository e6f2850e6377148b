"""TLS: H10 of research/nbd.md §1.10 over raw sockets, nbdinfo and qemu-img with X.509
certificates in the nbdkit/qemu layout, --tls=require refusing plaintext, and the client
certificate's subject reaching the server's identity (seen in the server's debug log)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket as socketlib
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.harness import MINIDISK, Server, short_dir
from tests.nbd.conftest import StartServer
from tests.nbd.nbd_helpers import Closed, RawClient
from tests.pki import Authority

from minidisk import control_client
from minidisk.nbd import protocol as p

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
CLIENT_CN = "nbd-test-client"


def make_certificates(directory: Path, client: bool = True) -> None:
    """ca-cert.pem, server-cert.pem, server-key.pem (+ client-cert.pem, client-key.pem for
    CLIENT_CN) in `directory`."""
    authority = Authority()
    authority.issue(directory, "localhost", "server")
    if client:
        authority.issue(directory, CLIENT_CN, "client")


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    directory = short_dir()
    make_certificates(directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def anonymous_pki(pki: Path) -> Iterator[Path]:
    """The same CA, without a client certificate."""
    directory = short_dir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(pki / name, directory / name)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def tls_server(start: StartServer, pki: Path, mode: str, *extra: str) -> Server:
    return start(f"--tls={mode}", "--tls-certificates", str(pki), *extra,
                 "--memory", "disk=4M")


def client_context(pki: Path, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki / "ca-cert.pem")
    if with_cert:
        ctx.load_cert_chain(pki / "client-cert.pem", pki / "client-key.pem")
    return ctx


def starttls(c: RawClient, ctx: ssl.SSLContext) -> None:
    [reply] = c.option(p.OPT_STARTTLS)
    assert reply.reply_type == p.REP_ACK and reply.data == b""
    c.sock = ctx.wrap_socket(c.sock)
    assert c.sock.version() == "TLSv1.3", c.sock.version()


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# -- H10 over raw sockets -------------------------------------------------------------------


def test_h10_starttls_refused_without_tls(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=1M")
    with RawClient(srv.socket) as c:
        c.handshake()
        [reply] = c.option(p.OPT_STARTTLS)
        assert reply.reply_type == p.REP_ERR_UNSUP, reply.reply_type  # no TLS configured
        assert c.go("disk")[0] == MiB


def test_h10_require_refuses_everything_but_starttls(start_server: StartServer,
                                                     pki: Path) -> None:
    srv = tls_server(start_server, pki, "require")
    with RawClient(srv.socket) as c:
        c.handshake()
        for opt, data in ((p.OPT_LIST, b""), (p.OPT_STRUCTURED_REPLY, b""), (99, b""),
                          (p.OPT_INFO, p.info_request("disk", [])),
                          (p.OPT_GO, p.info_request("disk", [])),
                          (p.OPT_LIST_META_CONTEXT, p.meta_context_request("disk", []))):
            [reply] = c.option(opt, data)
            assert reply.reply_type == p.REP_ERR_TLS_REQD, opt
        # STARTTLS with data is invalid, and does not start TLS.
        [reply] = c.option(p.OPT_STARTTLS, b"x")
        assert reply.reply_type == p.REP_ERR_INVALID
        starttls(c, client_context(pki))
        assert c.go("disk")[0] == 4 * MiB
        c.request(p.CMD_WRITE, 0, 5, payload=b"hello")
        assert c.read(0, 5) == b"hello"


def test_h10_require_export_name_disconnects(start_server: StartServer, pki: Path) -> None:
    srv = tls_server(start_server, pki, "require")
    with RawClient(srv.socket) as c:
        c.handshake()
        c.send_option(p.OPT_EXPORT_NAME, b"disk")
        assert c.is_closed()
    with RawClient(srv.socket) as c:
        c.handshake()
        assert c.option(p.OPT_ABORT)[0].reply_type == p.REP_ACK
        assert c.is_closed()


def test_h10_double_starttls_and_state_reset(start_server: StartServer, pki: Path) -> None:
    srv = tls_server(start_server, pki, "on")
    with RawClient(srv.socket) as c:
        c.handshake()
        assert c.option(p.OPT_STRUCTURED_REPLY)[-1].reply_type == p.REP_ACK
        assert c.option(p.OPT_SET_META_CONTEXT, p.meta_context_request(
            "disk", ["base:allocation"]))[-1].reply_type == p.REP_ACK
        starttls(c, client_context(pki))
        [reply] = c.option(p.OPT_STARTTLS)
        assert reply.reply_type == p.REP_ERR_INVALID  # TLS is already on
        # Structured replies and contexts negotiated in plaintext are forgotten.
        c.structured = False
        _, tflags = c.go("disk", structured=False)
        assert not tflags & p.TFLAG_SEND_DF
        read = c.request(p.CMD_READ, 0, 512)
        assert read.simple and read.errno == 0
        assert c.request(p.CMD_BLOCK_STATUS, 0, 512).errno == p.NBD_EINVAL


def test_h10_renegotiate_after_tls(start_server: StartServer, pki: Path) -> None:
    srv = tls_server(start_server, pki, "on")
    with RawClient(srv.socket) as c:
        c.handshake()
        starttls(c, client_context(pki))
        _, tflags = c.go("disk")  # SR and base:allocation again, under TLS
        assert tflags & p.TFLAG_SEND_DF
        assert c.request(p.CMD_BLOCK_STATUS, 0, 512).errno == 0


def test_h10_on_still_serves_plaintext(start_server: StartServer, pki: Path) -> None:
    srv = tls_server(start_server, pki, "on")
    with RawClient(srv.socket) as c:
        c.handshake()
        assert c.go("disk")[0] == 4 * MiB


def test_h10_failed_tls_handshake(start_server: StartServer, pki: Path) -> None:
    """A client that sends garbage instead of a TLS ClientHello is dropped; others go on."""
    srv = tls_server(start_server, pki, "require")
    with RawClient(srv.socket) as c:
        c.handshake()
        assert c.option(p.OPT_STARTTLS)[0].reply_type == p.REP_ACK
        c.send_unless_closed(b"GET / HTTP/1.0\r\n\r\n" * 10)
        assert c.is_closed()
    with RawClient(srv.socket) as c:
        c.handshake()
        starttls(c, client_context(pki))
        assert c.go("disk")[0] == 4 * MiB
    assert srv.alive()


def test_verify_peer_requires_client_certificate(start_server: StartServer, pki: Path) -> None:
    srv = tls_server(start_server, pki, "require", "--tls-verify-peer")
    with RawClient(srv.socket) as c:
        c.handshake()
        assert c.option(p.OPT_STARTTLS)[0].reply_type == p.REP_ACK
        try:
            c.sock = client_context(pki, with_cert=False).wrap_socket(c.sock)
            # TLS 1.3: the refusal arrives after the client's handshake completes
            c.send_option(p.OPT_LIST)
            c.read_option_reply()
        except (ssl.SSLError, Closed, OSError):
            pass
        else:
            raise AssertionError("a client without a certificate was served")
    with RawClient(srv.socket) as c:
        c.handshake()
        starttls(c, client_context(pki))
        assert c.go("disk")[0] == 4 * MiB


# -- real clients ---------------------------------------------------------------------------


def test_nbdinfo_tls(start_server: StartServer, pki: Path) -> None:
    srv = tls_server(start_server, pki, "require", "--tls-verify-peer")
    proc = run("nbdinfo", "--json", srv.uri("disk", "nbds+unix", f"tls-certificates={pki}"))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MiB
    # The verified client certificate became the connection's identity.
    assert f"client certificate subject CN={CLIENT_CN},O=minidisk tests" in srv.log_text()


def test_nbdinfo_tls_without_client_certificate(start_server: StartServer, pki: Path,
                                                anonymous_pki: Path) -> None:
    srv = tls_server(start_server, pki, "require")
    proc = run("nbdinfo", "--json",
               srv.uri("disk", "nbds+unix", f"tls-certificates={anonymous_pki}"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["TLS"] is True
    assert "client certificate subject None" in srv.log_text()


def test_require_refuses_plaintext_clients(start_server: StartServer, pki: Path) -> None:
    srv = tls_server(start_server, pki, "require")
    proc = run("nbdinfo", "--json", srv.uri("disk"))
    assert proc.returncode == 1  # libnbd reports ERR_TLS_REQD as ENOTSUP, as for nbdkit
    assert json.loads(proc.stdout.replace(",\n}", "}"))["TLS"] is False
    proc = run("qemu-img", "info", "-f", "raw", srv.uri("disk"))
    assert proc.returncode == 1
    assert srv.alive()


def test_qemu_img_tls(start_server: StartServer, pki: Path, tmp_path: Path) -> None:
    srv = tls_server(start_server, pki, "require", "--tls-verify-peer")
    source = tmp_path / "source.img"
    source.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    creds = f"tls-creds-x509,id=tls0,dir={pki},endpoint=client"
    image = (f"driver=nbd,server.type=unix,server.path={srv.socket},export=disk,tls-creds=tls0,"
             "tls-hostname=localhost")
    proc = run("qemu-img", "convert", "-n", "--object", creds, "-f", "raw", str(source),
               "--target-image-opts", image)
    assert proc.returncode == 0, proc.stderr
    proc = run("qemu-img", "compare", "--object", creds, "--image-opts",
               f"driver=raw,file.filename={source}", image)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"CN={CLIENT_CN}" in srv.log_text()


def test_tls_mode_needs_certificates(start_server: StartServer) -> None:
    with pytest.raises(RuntimeError, match="tls-certificates"):
        start_server("--tls=require", "--memory", "disk=1M")


def test_raw_h10_starttls_pipelined_garbage_is_not_plaintext(start_server: StartServer,
                                                             pki: Path) -> None:
    """Plaintext sent right behind STARTTLS must never be taken as an option under TLS
    (STARTTLS command injection): the server hangs up without answering it."""
    srv = tls_server(start_server, pki, "require")
    with RawClient(srv.socket) as c:
        c.handshake()
        c.send(struct.pack(">QII", p.IHAVEOPT, p.OPT_STARTTLS, 0)
               + struct.pack(">QII", p.IHAVEOPT, p.OPT_LIST, 0))
        received = b""
        while chunk := c.sock.recv(4096):
            received += chunk
        # Nothing, or just the STARTTLS ACK; never a LIST reply.
        assert received in (b"", p.option_reply(p.OPT_STARTTLS, p.REP_ACK)), received
    assert srv.alive()


@contextlib.contextmanager
def tcp_tls_server(pki: Path, admin_subject: str) -> Iterator[str]:
    """`minidisk serve -s --tls=require` on a free loopback port (control over TCP needs TLS)."""
    probe = socketlib.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    url = f"tcp://127.0.0.1:{port}/"
    proc = subprocess.Popen([MINIDISK, "serve", "-s", "--tls=require", "--tls-certificates",
                             str(pki), f"--admin-subject={admin_subject}",
                             "--memory", "disk=1M", url])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socketlib.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("listed", [False, True])
def test_control_over_tls_only_for_admin_subjects(pki: Path, listed: bool) -> None:
    subject = f"CN={CLIENT_CN},O=minidisk tests" if listed else "CN=someone,O=minidisk tests"
    with tcp_tls_server(pki, subject) as url:
        ctx = client_context(pki)
        if listed:
            assert "exports" in control_client.call(url, "exports", tls=ctx)
        else:
            with pytest.raises(control_client.ControlError) as refused:
                control_client.call(url, "exports", tls=ctx)
            assert "refused control commands" in str(refused.value)


def test_cli_control_uses_tls_from_the_environment(pki: Path) -> None:
    with tcp_tls_server(pki, f"CN={CLIENT_CN},O=minidisk tests") as url:
        plain = subprocess.run([MINIDISK, "etfs", "ls", "--server", url], capture_output=True,
                               text=True, env={k: v for k, v in os.environ.items()
                                               if k != "MINIDISK_TLS_CERTIFICATES"})
        assert plain.returncode == 1, plain.stderr
        env = {**os.environ, "MINIDISK_TLS_CERTIFICATES": str(pki)}
        listing = subprocess.run([MINIDISK, "etfs", "ls", "--server", url],
                                 capture_output=True, text=True, env=env)
        assert listing.returncode == 0 and "/disk" in listing.stdout, listing.stderr
        halted = subprocess.run([MINIDISK, "halt", url], capture_output=True, text=True,
                                env=env)
        assert halted.returncode == 0, halted.stderr
