"""The parts of the kernel-nbd backend that run without an nbd module: URI parsing, the
handshake (against a real server) and generic netlink framing (against the real kernel)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from minidisk.kernel import BadUriError, nbdkernel, parse_nbd_uri, persist
from minidisk.kernel.attach import choose_method
from minidisk.kernel.errors import AttachError
from minidisk.kernel.handshake import connect
from minidisk.kernel.netlink import GenericNetlink

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("text", "transport", "host", "port", "export", "tls"), [
    ("nbd://example.com/disk", "tcp", "example.com", 10809, "disk", False),
    ("nbd://example.com:1234/", "tcp", "example.com", 1234, "", False),
    ("nbds://[::1]:99/a%20b", "tcp", "::1", 99, "a b", True),
    ("nbd://h//dev/dk", "tcp", "h", 10809, "/dev/dk", False),
    ("nbd+vsock://3/x", "vsock", "3", 10809, "x", False),
])
def test_network_uris(text: str, transport: str, host: str, port: int, export: str,
                      tls: bool) -> None:
    uri = parse_nbd_uri(text)
    assert (uri.transport, uri.host, uri.port, uri.export, uri.tls) == (
        transport, host, port, export, tls)
    assert str(uri) == text


def test_unix_uri_keeps_absolute_and_resolves_relative_sockets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    uri = parse_nbd_uri("nbd+unix:///dev/dk?socket=/run/md.sock")
    assert (uri.transport, uri.socket, uri.export) == ("unix", "/run/md.sock", "dev/dk")
    assert str(uri) == "nbd+unix:///dev/dk?socket=/run/md.sock"
    monkeypatch.chdir("/tmp")
    relative = parse_nbd_uri("nbds+unix:///x?socket=s.sock&tls-certificates=/etc/pki")
    assert relative.socket == "/tmp/s.sock"
    assert str(relative) == "nbds+unix:///x?socket=/tmp/s.sock&tls-certificates=/etc/pki"


@pytest.mark.parametrize("text", [
    "", "nbd", "file:///x", "nbd+unix:///x", "nbd+unix://h/x?socket=/s", "nbd:///x",
    "nbd://h:99999/", "nbd+vsock://host/x", "nbd://h/x#frag", "nbd://user@h/x",
    "nbd://h/x?socket=/s", "nbd+unix:///x?socket=/a&socket=/b",
])
def test_bad_uris(text: str) -> None:
    with pytest.raises(BadUriError, match="bad NBD URI"):
        parse_nbd_uri(text)


def test_handshake_with_a_real_server(make_export: Callable[..., str]) -> None:
    uri = parse_nbd_uri(make_export("64M"))
    negotiated = connect(uri)
    try:
        assert negotiated.size == 64 << 20
        assert negotiated.multi_conn and not negotiated.read_only
        assert negotiated.block_size == 512  # nbdkit's memory plugin takes any size
        assert negotiated.sock.gettimeout() is None  # blocking, as the kernel expects
    finally:
        negotiated.sock.close()
    read_only = connect(parse_nbd_uri(make_export("1M", read_only=True)))
    read_only.sock.close()
    assert read_only.read_only and read_only.size == 1 << 20


@pytest.mark.parametrize(("minimum", "kernel"), [(512, 512), (1024, 1024), (4096, 4096),
                                                  (65536, 4096)])
def test_kernel_block_size_is_the_exports_minimum(make_export: Callable[..., str], minimum: int,
                                                  kernel: int) -> None:
    """Not the preferred size (4096 for nbdkit): 512-byte O_DIRECT works where it may."""
    uri = make_export("1M", filters=("blocksize-policy",),
                      params=(f"blocksize-minimum={minimum}", "blocksize-preferred=65536"))
    negotiated = connect(parse_nbd_uri(uri))
    negotiated.sock.close()
    assert negotiated.block_size == kernel


def test_handshake_errors(short_tmp: Path) -> None:
    with pytest.raises(AttachError, match="cannot connect"):
        connect(parse_nbd_uri(f"nbd+unix:///?socket={short_tmp}/none.sock"))
    with pytest.raises(AttachError, match="cannot use TLS"):
        connect(parse_nbd_uri("nbds://localhost/"))


def test_generic_netlink_resolves_families() -> None:
    with GenericNetlink() as nl:
        assert nl.family("nlctrl") == 0x10  # the controller resolves itself
        with pytest.raises(FileNotFoundError):
            nl.family("no-such-family")


def test_backend_choice_here() -> None:
    """On a kernel without nbd the kernel backend must step aside (CI machines)."""
    has_nbd = os.path.exists("/sys/module/nbd") or os.path.exists("/dev/nbd0")
    if has_nbd:
        assert nbdkernel.available() in ("netlink", "ioctl")
    else:
        assert nbdkernel.available() is None
        assert choose_method(parse_nbd_uri("nbd://h/")) == "nbdfuse"


def test_generic_netlink_joins_a_multicast_group() -> None:
    """The controller's own group, parsed from the real kernel's family reply (nbd's
    "nbd_mc_group" is joined the same way; the guest proves the rest)."""
    with GenericNetlink() as nl:
        assert nl.join("nlctrl", "notify") == 0x10
        with pytest.raises(FileNotFoundError, match="no group"):
            nl.join("nlctrl", "no-such-group")
        assert nl.event(0x10, 0.01) is None  # nothing happened: no event, no hang


def test_persist_keeper_reconnects_only_to_the_same_export(
        make_export: Callable[..., str], short_tmp: Path) -> None:
    """A restarted server offering another disk (here half the size) is not handed to the
    kernel: a file system on the device must not see a different disk."""
    first = connect(parse_nbd_uri(make_export("64M")))
    first.sock.close()
    export = persist.Export.of(first)
    with GenericNetlink() as events:
        other = parse_nbd_uri(make_export("32M"))
        keeper = persist.Keeper(events, 0, other, 4095, "minidisk-test", export)
        assert keeper.attempt() == ("not reconnecting: the export's size is now 0x2000000, "
                                    "the device's 0x4000000")
        gone = parse_nbd_uri(f"nbd+unix:///?socket={short_tmp}/none.sock")
        problem = persist.Keeper(events, 0, gone, 4095, "minidisk-test", export).attempt()
        assert problem is not None and "cannot connect" in problem
        assert not keeper.ours()  # no /sys/block/nbd4095: the keeper's loop ends at once
        keeper.run()
