"""Handshake rows of research/nbd.md §1.10 (H1–H9, H11; H10 is in test_tls.py).

Raw sockets for what libnbd will not send; libnbd (strict mode off, opt mode on) for the
client's view of the same behaviour.
"""

from __future__ import annotations

import struct

import pytest
from tests.harness import Server
from tests.nbd.nbd_helpers import Closed, RawClient, info_of, run_libnbd

from minidisk.nbd import protocol as p

pytestmark = pytest.mark.timeout(60)

SMALL = 1 << 20

OPT_LIST = struct.pack(">QII", p.IHAVEOPT, p.OPT_LIST, 0)


def test_h1_greeting(server: Server) -> None:
    with RawClient(server.socket) as c:
        magic, ihaveopt, hflags = c.greeting()
    assert magic == 0x4E42444D41474943  # "NBDMAGIC"
    assert ihaveopt == 0x49484156454F5054  # "IHAVEOPT"
    assert hflags & 1, "FIXED_NEWSTYLE must be offered"
    assert hflags & ~3 == 0, f"unknown handshake flags {hflags:#x}"


@pytest.mark.parametrize("client_flags", [1 << 2, 1 << 31, 0x3 | 1 << 7])
def test_h2_unknown_client_flag_closes(server: Server, client_flags: int) -> None:
    with RawClient(server.socket) as c:
        c.handshake(client_flags)
        c.send_unless_closed(OPT_LIST)  # must not be answered
        assert c.is_closed()


def test_h2_client_without_fixed_newstyle_closes(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake(0)
        c.send_unless_closed(OPT_LIST)
        assert c.is_closed()


@pytest.mark.parametrize("option", [99, p.OPT_PEEK_EXPORT, 0x7FFFFFFF, p.OPT_EXTENDED_HEADERS])
def test_h3_unknown_option_then_valid(server: Server, option: int) -> None:
    """ERR_UNSUP, and the next option still works (T16: extended headers are not offered,
    so OPT_EXTENDED_HEADERS is an unknown option too)."""
    with RawClient(server.socket) as c:
        c.handshake()
        [reply] = c.option(option, b"some data")
        assert reply.reply_type == p.REP_ERR_UNSUP
        size, _ = c.go("disk")
        assert size == 64 << 20


def test_h4_list(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        replies = c.option(p.OPT_LIST)
    assert replies[-1].reply_type == p.REP_ACK and replies[-1].data == b""
    names = []
    for r in replies[:-1]:
        assert r.reply_type == p.REP_SERVER
        (n,) = struct.unpack_from(">I", r.data)
        assert 4 + n <= len(r.data)
        names.append(r.data[4:4 + n].decode())
    assert names == ["disk", "small"]


def test_h4_list_with_data_is_invalid_and_consumed(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        [reply] = c.option(p.OPT_LIST, b"\x00\x00\x00\x04junk")
        assert reply.reply_type == p.REP_ERR_INVALID
        # The payload was consumed: the next option parses from the right place.
        assert c.option(p.OPT_LIST)[-1].reply_type == p.REP_ACK


def test_h4_libnbd_opt_list(server: Server) -> None:
    result = run_libnbd("""
        h = handle()
        h.connect_unix(params["sock"])
        names = []
        h.opt_list(lambda name, desc: names.append(name) or 0)
        h.opt_abort()
        result = names
    """, sock=server.socket)
    assert result == ["disk", "small"]


def test_h5_abort_acks_then_closes(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        [reply] = c.option(p.OPT_ABORT, b"ignored")
        assert reply.reply_type == p.REP_ACK and reply.data == b""
        assert c.is_closed()


def test_h5_abort_client_closing_early_is_harmless(server: Server) -> None:
    for _ in range(5):
        with RawClient(server.socket) as c:
            c.handshake()
            c.send_option(p.OPT_ABORT)
    with RawClient(server.socket) as c:  # the server is still fine
        c.handshake()
        assert c.go("disk")[0] == 64 << 20
    assert server.alive()


def test_h6_info_and_go_agree(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        assert c.option(p.OPT_STRUCTURED_REPLY)[-1].reply_type == p.REP_ACK
        request = p.info_request("small", [p.INFO_TYPE_BLOCK_SIZE, p.INFO_TYPE_NAME, 0x7777])
        info = c.option(p.OPT_INFO, request)
        go = c.option(p.OPT_GO, request)
    for replies in (info, go):
        assert replies[-1].reply_type == p.REP_ACK and replies[-1].data == b""
        export = info_of(replies, p.INFO_TYPE_EXPORT)
        assert len(export) == 10  # INFO_EXPORT is 12 bytes including its type
        size, tflags = struct.unpack(">QH", export)
        assert size == 1 << 20 and tflags & p.TFLAG_HAS_FLAGS
        minimum, preferred, maximum = struct.unpack(">III",
                                                    info_of(replies, p.INFO_TYPE_BLOCK_SIZE))
        assert minimum & (minimum - 1) == 0 and 1 <= minimum <= 65536
        assert preferred & (preferred - 1) == 0 and preferred >= max(minimum, 512)
        assert maximum >= preferred and maximum % minimum == 0
        assert info_of(replies, p.INFO_TYPE_NAME) == b"small"
    assert [(r.reply_type, r.data) for r in info] == [(r.reply_type, r.data) for r in go]


def test_h6_unknown_export(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        for opt in (p.OPT_INFO, p.OPT_GO):
            [reply] = c.option(opt, p.info_request("nope", []))
            assert reply.reply_type == p.REP_ERR_UNKNOWN
        assert c.go("")[0] == 64 << 20  # "" is the first export


def test_h6_bad_info_framing(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        # name length past the data; count promising more requests than there are
        for data in (b"\x00\x00\x00\x10ab\x00\x00", p.info_request("disk", [])[:-2] + b"\x00\x05",
                     b"\x00"):
            [reply] = c.option(p.OPT_GO, data)
            assert reply.reply_type == p.REP_ERR_INVALID
        assert c.go("disk")[0] == 64 << 20


def test_h6_libnbd_info_and_go(server: Server) -> None:
    result = run_libnbd("""
        h = handle()
        h.set_full_info(True)
        h.connect_unix(params["sock"])
        h.set_export_name("small")
        h.opt_info()
        info = [h.get_size(), h.get_canonical_export_name(),
                [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                               nbd.SIZE_MAXIMUM)]]
        h.set_export_name("missing")
        missing = err(h.opt_info)
        h.set_export_name("small")
        h.opt_go()
        result = [info, missing, h.get_size(), h.aio_is_ready()]
    """, sock=server.socket)
    info, missing, size, ready = result
    assert info == [1 << 20, "small", [1, 4096, 32 << 20]]
    assert missing != 0
    assert size == 1 << 20 and ready


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_h7_export_name(server: Server, no_zeroes: bool) -> None:
    flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)
    with RawClient(server.socket) as c:
        c.handshake(flags)
        c.send_option(p.OPT_EXPORT_NAME, b"small")
        reply = c.recv_exact(10 if no_zeroes else 134)
        size, tflags = struct.unpack_from(">QH", reply)
        assert size == 1 << 20 and tflags & p.TFLAG_HAS_FLAGS
        assert reply[10:] == bytes(124 if not no_zeroes else 0)
        assert not tflags & p.TFLAG_SEND_DF  # no structured replies were negotiated
        # Exactly that many bytes: the next thing on the wire is our READ's reply.
        data = c.read(0, 512)
        assert len(data) == 512


def test_h7_export_name_unknown_disconnects(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        c.send_option(p.OPT_EXPORT_NAME, b"no-such-export")
        assert c.is_closed()


def test_h8_structured_reply_with_data(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        [reply] = c.option(p.OPT_STRUCTURED_REPLY, b"x")
        assert reply.reply_type == p.REP_ERR_INVALID
        # It was not negotiated: GO gives no DF, and reads are simple.
        c.structured = False
        _, tflags = c.go("disk", structured=False)
        assert not tflags & p.TFLAG_SEND_DF
        assert c.request(p.CMD_READ, 0, 16).simple


def test_h8_meta_before_structured_reply(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        for opt in (p.OPT_SET_META_CONTEXT, p.OPT_LIST_META_CONTEXT):
            [reply] = c.option(opt, p.meta_context_request("disk", ["base:allocation"]))
            assert reply.reply_type == p.REP_ERR_INVALID


@pytest.mark.parametrize("data", [
    b"",
    b"\x00\x00\x00\x04disk",  # query count missing
    b"\x00\x00\x00\x04disk\x00\x00\x00\x01",  # one query promised, none there
    b"\x00\x00\x00\x04disk\x00\x00\x00\x01\x00\x00\x00\x20base:allocation",  # short query
    p.meta_context_request("disk", ["base:allocation"]) + b"trailing",
    b"\x00\x00\x01\x00disk\x00\x00\x00\x00",  # name runs past the data
])
def test_h8_malformed_meta_framing(server: Server, data: bytes) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        assert c.option(p.OPT_STRUCTURED_REPLY)[-1].reply_type == p.REP_ACK
        for opt in (p.OPT_SET_META_CONTEXT, p.OPT_LIST_META_CONTEXT):
            [reply] = c.option(opt, data)
            assert reply.reply_type == p.REP_ERR_INVALID
        assert c.go("disk")[0] == 64 << 20


def _contexts(replies: list) -> list[tuple[int, str]]:  # type: ignore[type-arg]
    out = []
    for r in replies[:-1]:
        assert r.reply_type == p.REP_META_CONTEXT
        out.append((struct.unpack_from(">I", r.data)[0], r.data[4:].decode()))
    assert replies[-1].reply_type == p.REP_ACK
    return out


def test_h9_set_meta_base_allocation_and_unknown(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        c.option(p.OPT_STRUCTURED_REPLY)
        replies = c.option(p.OPT_SET_META_CONTEXT, p.meta_context_request(
            "disk", ["base:allocation", "qemu:dirty-bitmap:x", "nosuch:thing"]))
        [(ctx_id, name)] = _contexts(replies)
        assert name == "base:allocation"
        c.go("disk", meta=False)
        c.structured = True
        reply = c.request(p.CMD_BLOCK_STATUS, 0, 4096)
        chunk = reply.chunks[0]
        assert chunk.chunk_type == p.REPLY_TYPE_BLOCK_STATUS
        assert struct.unpack_from(">I", chunk.payload)[0] == ctx_id


@pytest.mark.parametrize("queries, expected", [
    ([], ["base:allocation"]),
    (["base:"], ["base:allocation"]),
    (["base:allocation"], ["base:allocation"]),
    (["nosuch:"], []),
])
def test_h9_list_meta(server: Server, queries: list[str], expected: list[str]) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        c.option(p.OPT_STRUCTURED_REPLY)
        contexts = _contexts(c.option(p.OPT_LIST_META_CONTEXT,
                                      p.meta_context_request("disk", queries)))
    assert [name for _, name in contexts] == expected


def test_h9_set_meta_zero_queries_and_base_alone_select_nothing(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        c.option(p.OPT_STRUCTURED_REPLY)
        assert _contexts(c.option(p.OPT_SET_META_CONTEXT,
                                  p.meta_context_request("disk", ["base:allocation"])))
        # A later SET replaces the selection: with zero queries nothing stays selected.
        assert _contexts(c.option(p.OPT_SET_META_CONTEXT,
                                  p.meta_context_request("disk", []))) == []
        assert _contexts(c.option(p.OPT_SET_META_CONTEXT,
                                  p.meta_context_request("disk", ["base:"]))) == []
        c.go("disk", meta=False)
        c.structured = True
        assert c.request(p.CMD_BLOCK_STATUS, 0, 4096).errno == p.NBD_EINVAL


def test_h9_meta_for_another_export_does_not_carry_over(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        c.option(p.OPT_STRUCTURED_REPLY)
        assert _contexts(c.option(p.OPT_SET_META_CONTEXT,
                                  p.meta_context_request("small", ["base:allocation"])))
        c.go("disk", meta=False)
        c.structured = True
        assert c.request(p.CMD_BLOCK_STATUS, 0, 4096).errno == p.NBD_EINVAL


def test_h9_libnbd_list_meta(server: Server) -> None:
    result = run_libnbd("""
        h = handle()
        h.connect_unix(params["sock"])
        h.set_export_name("disk")
        seen = []
        n = h.opt_list_meta_context(lambda name: seen.append(name) or 0)
        h.opt_go()
        result = [n, seen, h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)]
    """, sock=server.socket)
    assert result == [1, ["base:allocation"], True]


def test_h11_long_strings(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        c.option(p.OPT_STRUCTURED_REPLY)
        long_name = "x" * 5000
        for opt, data in ((p.OPT_GO, p.info_request(long_name, [])),
                          (p.OPT_INFO, p.info_request(long_name, [])),
                          (p.OPT_SET_META_CONTEXT, p.meta_context_request(long_name, [])),
                          (p.OPT_LIST_META_CONTEXT,
                           p.meta_context_request("disk", ["base:" + long_name]))):
            [reply] = c.option(opt, data)
            # A string over the spec's 4096 bytes: NBD_REP_ERR_TOO_BIG, as the spec says.
            assert reply.reply_type == p.REP_ERR_TOO_BIG, (opt, reply.reply_type)
        assert c.go("disk")[0] == 64 << 20


@pytest.mark.parametrize("length", [0x7FFFFFFF, 0xFFFFFFFF, 64 * 1024 * 1024])
def test_h11_huge_option_length(server: Server, length: int) -> None:
    """A declared length the server will not buffer (over MAX_OPTION_DATA): a disconnect,
    no crash, and the next client is served."""
    with RawClient(server.socket) as c:
        c.handshake()
        c.send(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, length) + b"\x00" * 1024)
        with pytest.raises(Closed):
            c.read_option_reply()
    with RawClient(server.socket) as c:
        c.handshake()
        assert c.go("disk")[0] == 64 << 20
    assert server.alive()


def test_h11_bad_option_magic_disconnects(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.handshake()
        c.send(struct.pack(">QII", 0x1234, p.OPT_LIST, 0))
        assert c.is_closed()


def test_pipelined_options(server: Server) -> None:
    """Options sent back to back without waiting are answered in order."""
    with RawClient(server.socket) as c:
        c.handshake()
        c.send(b"".join(struct.pack(">QII", p.IHAVEOPT, opt, len(d)) + d for opt, d in (
            (99, b""), (p.OPT_STRUCTURED_REPLY, b""),
            (p.OPT_SET_META_CONTEXT, p.meta_context_request("disk", ["base:allocation"])),
            (p.OPT_GO, p.info_request("disk", [])))))
        assert c.read_option_reply().reply_type == p.REP_ERR_UNSUP
        assert c.read_option_reply().reply_type == p.REP_ACK
        assert c.read_option_reply().reply_type == p.REP_META_CONTEXT
        assert c.read_option_reply().reply_type == p.REP_ACK
        while (r := c.read_option_reply()).reply_type == p.REP_INFO:
            pass
        assert r.reply_type == p.REP_ACK
        c.structured = True
        assert c.request(p.CMD_BLOCK_STATUS, 0, 512).errno == 0


@pytest.mark.parametrize("option", [p.OPT_GO, p.OPT_EXPORT_NAME])
def test_first_request_pipelined_behind_go(server: Server, option: int) -> None:
    """Bytes after GO/EXPORT_NAME are transmission, even when they arrive in one segment."""
    with RawClient(server.socket) as c:
        c.handshake()
        data = p.info_request("small", []) if option == p.OPT_GO else b"small"
        c.send(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data
               + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, 5, 0, 16))
        c.pending[5] = (p.CMD_READ, 16)
        if option == p.OPT_GO:
            while (r := c.read_option_reply()).reply_type == p.REP_INFO:
                pass
            assert r.reply_type == p.REP_ACK
        else:
            assert struct.unpack(">QH", c.recv_exact(10))[0] == SMALL
        reply = c.replies(1)[5]
        assert reply.simple and reply.errno == 0 and len(reply.data) == 16
