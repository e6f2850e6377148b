"""The NBD codec in memory, as h11 tests its Connection without sockets: the server's
`Negotiation` against the client's `ClientNegotiation`, `check_request`, and the reply
encoders against the client's decoders. Nothing here opens a socket or runs a loop."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidisk.device.api import BlockDevice, BlockSize
from minidisk.device.memory import MemoryDevice
from minidisk.nbd import client_negotiation as cn
from minidisk.nbd import protocol as p
from minidisk.nbd import replies as r
from minidisk.nbd.checks import check_request
from minidisk.nbd.exports import Access, DictExports, Identity
from minidisk.nbd.negotiation import Action, Negotiation, TLSMode, TransmissionTerms
from minidisk.nbd.transport import Transport
from minidisk.nbd.uri import NBDURI, BadURI

PEER = Identity(Transport.UNIX, uid=1000)


def _server(tls_mode: TLSMode = TLSMode.OFF, read_only_for: str = "",
            control: bool = False, **devices: BlockDevice) -> Negotiation:
    exports = DictExports(devices or {"disk": MemoryDevice(1 << 20, BlockSize(512))})

    def policy(identity: Identity, name: str) -> Access:
        return Access.READ_ONLY if name == read_only_for else Access.READ_WRITE

    return Negotiation(exports, PEER, policy, tls_mode, control_allowed=control)


class Wire:
    """The server side of one connection in memory: client bytes in, reply bytes out, the
    actions the connection (server.py) would carry out recorded."""

    def __init__(self, server: Negotiation) -> None:
        self.server = server
        self.reader = p.HandshakeReader()
        self.actions: list[Action] = []
        self.out = bytearray(p.greeting())

    def client_sent(self, data: bytes) -> None:
        self.reader.append(data)
        while (event := self.reader.next_event()) is not None:
            if isinstance(event, p.ClientFlags):
                outcome = self.server.client_flags(event.flags)
            else:
                outcome = self.server.option(event.option, event.data)
            self.out += b"".join(outcome.replies)
            if outcome.action is not Action.CONTINUE:
                self.actions.append(outcome.action)
                if outcome.action is not Action.CONTROL:
                    return  # what follows is TLS or transmission: not the reader's

    def take(self, n: int) -> bytes:
        """Exactly the n bytes the client asked for (a test failure if the server owes
        fewer: a client asking for more than was sent would hang on a socket)."""
        assert len(self.out) >= n, f"client wants {n} bytes, server sent {len(self.out)}"
        data = bytes(self.out[:n])
        del self.out[:n]
        return data


def drive(client: cn.ClientNegotiation, wire: Wire) -> cn.Event:
    """A driver as client.py and blocking.py are, with exact reads."""
    while True:
        event = client.next_event()
        wire.client_sent(client.data_to_send())
        if event is not None:
            return event
        client.receive_data(wire.take(client.wanted))


# -- client against server ------------------------------------------------------------------


def test_go_with_structured_replies_and_base_allocation() -> None:
    server = _server()
    client = cn.ClientNegotiation("disk", structured=True, base_allocation=True)
    wire = Wire(server)
    event = drive(client, wire)
    assert isinstance(event, cn.Negotiated)
    assert (event.size, event.block_size) == (1 << 20, (512, 4096, BlockSize().maximum))
    assert event.structured and event.context_id == p.META_CONTEXT_ID
    assert event.tflags & p.TFLAG_SEND_DF and not event.tflags & p.TFLAG_READ_ONLY
    assert wire.actions == [Action.TRANSMIT] and not wire.out  # nothing left unread
    assert client.state is cn.State.TRANSMISSION
    session = server.session
    assert session == TransmissionTerms(structured=True, base_allocation=True,
                                        tflags=event.tflags, no_zeroes=True)


def test_plain_go_for_the_kernel() -> None:
    """No structured replies asked for: none negotiated, no block status context."""
    server = _server(read_only_for="disk")
    event = drive(cn.ClientNegotiation("/disk"), Wire(server))
    assert isinstance(event, cn.Negotiated)
    assert not event.structured and event.context_id is None
    assert event.tflags & p.TFLAG_READ_ONLY
    assert server.session is not None and not server.session.base_allocation


def test_unknown_export_is_refused() -> None:
    client = cn.ClientNegotiation("nope")
    with pytest.raises(cn.OptionRefused) as refused:
        drive(client, Wire(_server()))
    assert (refused.value.option, refused.value.reply) == (p.OPT_GO, p.REP_ERR_UNKNOWN)
    assert refused.value.reason == "no such export" and "nope" in refused.value.message


def test_tls_required_refuses_a_plaintext_go() -> None:
    with pytest.raises(cn.OptionRefused) as refused:
        drive(cn.ClientNegotiation("disk"), Wire(_server(TLSMode.REQUIRE)))
    assert refused.value.reply == p.REP_ERR_TLS_REQD


def test_starttls_then_everything_again() -> None:
    """After TLS the plan goes on, and what was negotiated before it would be forgotten."""
    server = _server(TLSMode.REQUIRE)
    client = cn.ClientNegotiation("disk", tls=True, structured=True, base_allocation=True)
    wire = Wire(server)
    assert isinstance(drive(client, wire), cn.StartTLS)
    assert wire.actions == [Action.STARTTLS] and client.state is cn.State.STARTING_TLS
    with pytest.raises(cn.LocalProtocolError):
        client.send_option(p.OPT_LIST)
    server.tls_started()  # both ends "start TLS" here
    client.tls_started()
    event = drive(client, wire)
    assert isinstance(event, cn.Negotiated) and event.structured
    assert event.context_id == p.META_CONTEXT_ID and client.tls_active


def test_starttls_refused_is_an_error() -> None:
    with pytest.raises(cn.OptionRefused) as refused:
        drive(cn.ClientNegotiation("disk", tls=True), Wire(_server(TLSMode.OFF)))
    assert (refused.value.option, refused.value.reply) == (p.OPT_STARTTLS, p.REP_ERR_UNSUP)


def test_control_session_sends_its_own_options_then_aborts() -> None:
    server = _server(control=True)
    client = cn.ClientNegotiation(None)
    wire = Wire(server)
    assert isinstance(drive(client, wire), cn.Ready)
    with pytest.raises(cn.LocalProtocolError):
        client.next_event()  # nothing is owed in the option phase
    client.send_option(p.OPT_MINIDISK_CONTROL, b'{"command": "x"}')
    wire.client_sent(client.data_to_send())
    # The connection runs the command and sends its result; the negotiation only asks.
    assert wire.actions == [Action.CONTROL] and not wire.out
    wire.out += p.option_reply(p.OPT_MINIDISK_CONTROL, p.REP_MINIDISK_RESULT, b"{}")
    result = drive(client, wire)
    assert result == cn.OptionResult(p.OPT_MINIDISK_CONTROL, p.REP_MINIDISK_RESULT, b"{}")
    client.send_option(p.OPT_LIST)
    listed = drive(client, wire)
    assert isinstance(listed, cn.OptionResult) and listed.reply == p.REP_ACK
    client.abort()
    wire.client_sent(client.data_to_send())
    assert wire.actions == [Action.CONTROL, Action.CLOSE] and client.state is cn.State.CLOSED


def test_a_server_without_control_answers_unsupported() -> None:
    client = cn.ClientNegotiation(None)
    wire = Wire(_server(control=False))
    drive(client, wire)
    client.send_option(p.OPT_MINIDISK_CONTROL, b"{}")
    result = drive(client, wire)
    assert isinstance(result, cn.OptionResult) and result.refused
    assert result.reply == p.REP_ERR_UNSUP


def test_byte_at_a_time_reads_exactly_what_is_wanted() -> None:
    """Fed one byte at a time, the client never asks for more than the server sent: the
    property that keeps TLS and transmission bytes out of its buffer."""
    wire = Wire(_server())
    client = cn.ClientNegotiation("disk", structured=True, base_allocation=True)
    while (event := client.next_event()) is None:
        wire.client_sent(client.data_to_send())
        assert 0 < client.wanted <= len(wire.out)
        client.receive_data(wire.take(1))
    assert isinstance(event, cn.Negotiated) and not wire.out


# -- the client against hand-made server bytes ----------------------------------------------

GREETING = struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)


def _fed(client: cn.ClientNegotiation, data: bytes) -> cn.Event | None:
    client.receive_data(data)
    return client.next_event()


@pytest.mark.parametrize(("greeting", "word"), [
    (struct.pack(">QQH", p.NBDMAGIC, 0x1C950A0000000000, 0), "newstyle"),  # oldstyle
    (struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 0), "fixed newstyle"),
])
def test_not_a_fixed_newstyle_server(greeting: bytes, word: str) -> None:
    with pytest.raises(r.NotNBDServer, match=word):
        _fed(cn.ClientNegotiation("x"), greeting)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_when_go_is_unsupported(no_zeroes: bool) -> None:
    client = cn.ClientNegotiation("old", export_name_fallback=True)
    flags = p.FLAG_FIXED_NEWSTYLE | (p.FLAG_NO_ZEROES if no_zeroes else 0)
    assert _fed(client, struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, flags)) is None
    sent = client.data_to_send()
    assert p.CLIENT_FLAGS.unpack_from(sent)[0] & p.FLAG_C_NO_ZEROES == (2 if no_zeroes else 0)
    assert _fed(client, p.option_reply(p.OPT_GO, p.REP_ERR_UNSUP)) is None
    assert client.data_to_send() == p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 3) + b"old"
    reply = p.EXPORT_NAME_REPLY.pack(1 << 30, p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY)
    assert client.wanted == len(reply) + (0 if no_zeroes else 124)
    event = _fed(client, reply + (b"" if no_zeroes else bytes(124)))
    assert event == cn.Negotiated(1 << 30, p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY, None,
                                  False, None)


def test_go_unsupported_without_fallback_is_refused() -> None:
    client = cn.ClientNegotiation("x")
    _fed(client, GREETING)
    with pytest.raises(cn.OptionRefused, match="GO refused: option unsupported"):
        _fed(client, p.option_reply(p.OPT_GO, p.REP_ERR_UNSUP))


def test_plaintext_behind_the_starttls_ack_is_refused() -> None:
    """Bytes the server sends after acknowledging STARTTLS would be taken as if they had come
    over TLS (STARTTLS injection, the client-side mirror of the server's check)."""
    client = cn.ClientNegotiation("x", tls=True)
    _fed(client, GREETING)
    with pytest.raises(r.UnexpectedReply, match="no option asked for"):
        _fed(client, p.option_reply(p.OPT_STARTTLS, p.REP_ACK)
             + p.option_reply(p.OPT_GO, p.REP_ACK))


def test_a_refused_structured_reply_means_simple_replies() -> None:
    client = cn.ClientNegotiation("x", structured=True, base_allocation=True)
    _fed(client, GREETING)
    client.data_to_send()  # the client flags and STRUCTURED_REPLY
    assert _fed(client, p.option_reply(p.OPT_STRUCTURED_REPLY, p.REP_ERR_UNSUP)) is None
    options = client.data_to_send()  # GO comes next: no SET_META_CONTEXT without SR
    assert p.OPTION_HEADER.unpack_from(options)[1] == p.OPT_GO


def test_reply_headers_are_checked_before_their_data() -> None:
    client = cn.ClientNegotiation("x")
    _fed(client, GREETING)
    with pytest.raises(r.BadReplyLength):
        _fed(client, p.OPTION_REPLY.pack(p.REPLY_MAGIC, p.OPT_GO, p.REP_INFO, 0xFFFFFFFF))


def test_local_protocol_errors() -> None:
    client = cn.ClientNegotiation(None)
    for misuse in (client.abort, client.tls_started, lambda: client.send_option(1)):
        with pytest.raises(cn.LocalProtocolError):
            misuse()
    _fed(client, GREETING)  # Ready
    with pytest.raises(cn.LocalProtocolError):
        client.receive_data(b"x")


# -- the server's Negotiation alone ---------------------------------------------------------


def _options(server: Negotiation, *options: tuple[int, bytes]) -> list[Action]:
    assert server.client_flags(p.FLAG_C_FIXED_NEWSTYLE).action is Action.CONTINUE
    return [server.option(opt, data).action for opt, data in options]


def test_server_closes_on_unknown_client_flags() -> None:
    assert _server().client_flags(p.FLAG_C_FIXED_NEWSTYLE | 0x80).action is Action.CLOSE
    assert _server().client_flags(0).action is Action.CLOSE  # not fixed newstyle


def test_server_bounds_options_before_an_export() -> None:
    server = _server()
    actions = _options(server, *[(p.OPT_STRUCTURED_REPLY + 1000, b"")] * 33)
    assert actions[:32] == [Action.CONTINUE] * 32 and actions[32] is Action.CLOSE


def test_server_lists_once() -> None:
    server = _server()
    server.client_flags(p.FLAG_C_FIXED_NEWSTYLE)
    first = server.option(p.OPT_LIST, b"")
    assert len(first.replies) == 2  # one export, then ACK
    again = server.option(p.OPT_LIST, b"")
    assert struct.unpack_from(">QIII", again.replies[0])[2] == p.REP_ERR_INVALID


def test_server_info_does_not_enter_transmission_and_export_name_closes_when_unknown() -> None:
    server = _server()
    info = p.info_request("disk", [p.INFO_TYPE_NAME])
    assert _options(server, (p.OPT_INFO, info)) == [Action.CONTINUE]
    assert server.session is None
    assert server.option(p.OPT_EXPORT_NAME, b"nope").action is Action.CLOSE


def test_server_meta_context_needs_structured_replies() -> None:
    server = _server()
    server.client_flags(p.FLAG_C_FIXED_NEWSTYLE)
    outcome = server.option(p.OPT_SET_META_CONTEXT, p.meta_context_request(
        "disk", [p.META_BASE_ALLOCATION]))
    assert struct.unpack_from(">QIII", outcome.replies[0])[2] == p.REP_ERR_INVALID


def test_server_require_tls_hangs_up_on_export_name() -> None:
    server = _server(TLSMode.REQUIRE)
    assert _options(server, (p.OPT_EXPORT_NAME, b"disk")) == [Action.CLOSE]


# -- check_request --------------------------------------------------------------------------

DEVICE = MemoryDevice(1 << 20, BlockSize(512, 4096, 1 << 20))
ALL = (p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_SEND_TRIM
       | p.TFLAG_SEND_WRITE_ZEROES | p.TFLAG_SEND_DF | p.TFLAG_SEND_CACHE)


@pytest.mark.parametrize(("tflags", "cmd", "flags", "offset", "length", "error", "why"), [
    (ALL, p.CMD_READ, 0, 0, 4096, 0, ""),
    (ALL, 99, 0, 0, 0, p.NBD_EINVAL, "unknown command"),
    (ALL, p.CMD_READ, 1 << 9, 0, 512, p.NBD_EINVAL, "unknown flags"),
    (ALL, p.CMD_READ, p.CMD_FLAG_NO_HOLE, 0, 512, p.NBD_EINVAL, "only valid on WRITE_ZEROES"),
    (ALL, p.CMD_WRITE_ZEROES, p.CMD_FLAG_FAST_ZERO, 0, 512, p.NBD_EINVAL, "FAST_ZERO"),
    (ALL, p.CMD_READ, p.CMD_FLAG_REQ_ONE, 0, 512, p.NBD_EINVAL, "REQ_ONE"),
    (ALL & ~p.TFLAG_SEND_FUA, p.CMD_WRITE, p.CMD_FLAG_FUA, 0, 512, p.NBD_EINVAL, "FUA"),
    # A write to a read-only export is EPERM before it is found out of range.
    (ALL | p.TFLAG_READ_ONLY, p.CMD_WRITE, 0, 1 << 30, 512, p.NBD_EPERM, "read-only"),
    (ALL, p.CMD_FLUSH, 0, 0, 1, p.NBD_EINVAL, "zero offset and length"),
    (ALL & ~p.TFLAG_SEND_TRIM, p.CMD_TRIM, 0, 0, 512, p.NBD_EINVAL, "TRIM was not"),
    (ALL, p.CMD_BLOCK_STATUS, 0, 0, 512, p.NBD_EINVAL, "no metadata context"),
    (ALL, p.CMD_WRITE, 0, (1 << 20) - 512, 1024, p.NBD_ENOSPC, "past the end"),
    (ALL, p.CMD_READ, 0, (1 << 20) - 512, 1024, p.NBD_EINVAL, "past the end"),
    (ALL, p.CMD_READ, 0, 256, 512, p.NBD_EINVAL, "aligned"),
    (ALL, p.CMD_READ, p.CMD_FLAG_DF, 0, 1 << 20, 0, ""),
])
def test_check_request(tflags: int, cmd: int, flags: int, offset: int, length: int,
                       error: int, why: str) -> None:
    session = TransmissionTerms(structured=True, base_allocation=False, tflags=tflags,
                                no_zeroes=True)
    err, reason = check_request(session, DEVICE, cmd, flags, offset, length)
    assert err == error and why in reason


def test_check_request_over_the_maximum() -> None:
    device = MemoryDevice(64 << 20, BlockSize(1, 4096, 1 << 20))
    session = TransmissionTerms(structured=True, base_allocation=True, tflags=ALL,
                                no_zeroes=True)
    assert check_request(session, device, p.CMD_READ, p.CMD_FLAG_DF, 0, 2 << 20)[0] == \
        p.NBD_EOVERFLOW
    assert check_request(session, device, p.CMD_READ, 0, 0, 2 << 20)[0] == p.NBD_EINVAL
    assert check_request(session, device, p.CMD_BLOCK_STATUS, 0, 0, 0)[0] == p.NBD_EINVAL


# -- reply encoders against the client's decoders -------------------------------------------


def _decode_read(wire: bytes, offset: int, length: int) -> tuple[bytearray, list[tuple[int, int]]]:
    """What the asyncio client makes of a structured READ reply (client.py's steps)."""
    expected = r.ExpectedReply(p.CMD_READ, offset, length, structured=True)
    buf, holes, pos, done = bytearray(b"\xee" * length), [], 0, False
    while not done:
        assert r.reply_magic(wire[pos:pos + 4]) == p.STRUCTURED_REPLY_MAGIC
        header = r.ChunkHeader.parse(wire[pos + 4:pos + p.CHUNK.size])
        pos += p.CHUNK.size
        expected.chunk(header)
        payload = wire[pos:pos + header.length]
        pos += header.length
        if header.chunk_type == p.REPLY_TYPE_OFFSET_DATA:
            start, size = expected.data_chunk(header, payload[:8])
            buf[start:start + size] = payload[8:]
        elif header.chunk_type == p.REPLY_TYPE_OFFSET_HOLE:
            hole_offset, start, size = expected.hole_chunk(payload)
            buf[start:start + size] = bytes(size)
            holes.append((hole_offset, size))
        done = header.done
    expected.finished()
    assert pos == len(wire)
    return buf, holes


@given(st.lists(st.booleans(), min_size=1, max_size=12), st.integers(0, 1 << 40))
def test_structured_read_round_trip(runs: list[bool], offset: int) -> None:
    """Runs of 512 bytes, each data or hole: what the server encodes, the client decodes."""
    length = 512 * len(runs)
    data = bytearray()
    holes: list[tuple[int, int]] = []  # (offset, length), adjacent holes merged
    for i, hole in enumerate(runs):
        data += bytes(512) if hole else bytes([i + 1]) * 512
        if hole:
            start = offset + 512 * i
            if holes and holes[-1][0] + holes[-1][1] == start:
                holes[-1] = (holes[-1][0], holes[-1][1] + 512)
            else:
                holes.append((start, 512))
    wire = b"".join(p.read_reply(7, offset, memoryview(data), holes, structured=True))
    buf, seen = _decode_read(wire, offset, length)
    assert buf == data and seen == holes


def test_simple_and_empty_reads() -> None:
    data = memoryview(b"abc")
    assert b"".join(p.read_reply(5, 0, data, [], False)) == p.simple_reply(5) + b"abc"
    none = b"".join(p.read_reply(5, 0, memoryview(b""), [], True))
    assert r.ChunkHeader.parse(none[4:]).chunk_type == p.REPLY_TYPE_NONE


@pytest.mark.parametrize(("extents", "req_one", "decoded"), [
    ([(0, 512, 3), (512, 3584, 0)], False, [(0, 512, 3), (512, 3584, 0)]),
    ([(0, 512, 3), (512, 3584, 0)], True, [(0, 512, 3)]),
    ([(0, 1 << 20, 1)], False, [(0, 4096, 1)]),  # cut at the request's end
    ([(0, 512, 0), (1024, 512, 0)], False, [(0, 512, 0)]),  # a gap ends the reply
    ([], False, [(0, 4096, 0)]),  # nothing known: all data
])
def test_block_status_round_trip(extents: list[tuple[int, int, int]], req_one: bool,
                                 decoded: list[tuple[int, int, int]]) -> None:
    wire = p.block_status_reply(9, 0, 4096, extents, req_one)
    header = r.ChunkHeader.parse(wire[4:p.CHUNK.size])
    expected = r.ExpectedReply(p.CMD_BLOCK_STATUS, 0, 4096, structured=True, req_one=req_one)
    expected.chunk(header)
    assert expected.block_status(wire[p.CHUNK.size:], p.META_CONTEXT_ID) == decoded
    expected.finished()


def test_error_reply_is_a_chunk_only_where_structured() -> None:
    chunk = p.error_reply(3, p.CMD_READ, True, p.NBD_EIO, "bad sector")
    header = r.ChunkHeader.parse(chunk[4:p.CHUNK.size])
    assert r.parse_error_chunk(header.chunk_type, chunk[p.CHUNK.size:]) == (p.NBD_EIO,
                                                                            "bad sector")
    assert p.error_reply(3, p.CMD_WRITE, True, p.NBD_EIO, "x") == p.simple_reply(3, p.NBD_EIO)
    simple = p.error_reply(3, p.CMD_READ, False, p.NBD_EPERM, "x")
    assert r.parse_simple_reply(simple[4:]) == (p.NBD_EPERM, 3)


# -- URIs -------------------------------------------------------------------------------------


def test_uri_timeout_and_certificates() -> None:
    uri = NBDURI.parse("nbds://h:99/d?tls-certificates=/pki&timeout=2.5")
    assert (uri.where, uri.tls_certificates, uri.timeout, uri.export) == ("h:99", "/pki", 2.5,
                                                                          "d")
    assert NBDURI.parse("nbd://h/").timeout is None


@pytest.mark.parametrize("text", ["nbd://h/?timeout=0", "nbd://h/?timeout=inf",
                                  "nbd://h/?timeout=x", "nbd://h/?bogus=1"])
def test_bad_uri_query(text: str) -> None:
    with pytest.raises(BadURI, match="bad NBD URI"):
        NBDURI.parse(text)
