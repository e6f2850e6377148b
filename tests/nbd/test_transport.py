"""Transports as the server names them: a socket inherited through systemd activation is a
unix or a TCP one as its family says (there is no third kind), so a uid that SO_PEERCRED
proves over it counts exactly as over a socket the server bound itself."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from minidisk.nbd import protocol as p
from minidisk.nbd.exports import DictExports, Identity, local_admins
from minidisk.nbd.listen import ListenAddress, parse_url
from minidisk.nbd.server import NBDServer
from minidisk.nbd.transport import Transport
from minidisk.nbd.uri import NBDURI

GREETING = 8 + 8 + 2  # NBDMAGIC, IHAVEOPT, handshake flags: connection_made has run


def test_inherited_sockets_are_unix_or_tcp(tmp_path: Path) -> None:
    path = str(tmp_path / "inherited.sock")
    # As systemd passes them: bound and listening before the server sees them.
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    host, port = tcp.getsockname()

    async def serve() -> list[Identity]:
        server = NBDServer(DictExports({}))
        for sock in (unix, tcp):
            await server.listeners.listen_socket(sock)
        clients = [await asyncio.open_unix_connection(path),
                   await asyncio.open_connection(host, port)]
        for reader, _ in clients:
            assert (await reader.readexactly(GREETING))[:8] == p.NBDMAGIC.to_bytes(8, "big")
        identities = [c.identity for c in server.connections if c.identity is not None]
        for _, writer in clients:
            writer.close()
        await server.shutdown(timeout=5)
        return identities

    by_transport = {i.transport: i for i in asyncio.run(serve())}
    assert set(by_transport) == {Transport.UNIX, Transport.TCP}
    assert by_transport[Transport.UNIX].uid == os.geteuid()
    assert local_admins(by_transport[Transport.UNIX])  # as over a socket we bound
    assert by_transport[Transport.TCP].uid is None
    assert not local_admins(by_transport[Transport.TCP])


def test_printed_forms() -> None:
    """What users write and read is unchanged: URLs, and the transport in messages."""
    assert parse_url("unix://x.sock") == ListenAddress(Transport.UNIX, path="x.sock")
    assert str(parse_url("tcp://0:10809/")) == "tcp://0.0.0.0:10809/"
    assert str(parse_url("-")) == "stdio"
    assert NBDURI.parse("nbd+vsock://3/disk").transport is Transport.VSOCK
    assert f"{Transport.UNIX}" == "unix" and Transport("tcp") is Transport.TCP
    # the daemon logs identities ("control halt by Identity(transport='unix', ...)")
    assert repr(Identity(Transport.UNIX, uid=0)).startswith("Identity(transport='unix', ")
