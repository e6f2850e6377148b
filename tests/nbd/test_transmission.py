"""Transmission rows of research/nbd.md §1.10 (T1–T12, T14, T15's DISC part).

Each test that writes to the shared `server` uses its own MiB of the 64 MiB export `disk`
(REGION), so tests stay independent in any order and under xdist.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from tests.harness import Server
from tests.nbd.conftest import StartServer
from tests.nbd.nbd_helpers import RawClient, block_status, read_data, run_libnbd

from minidisk.nbd import protocol as p

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
DISK = 64 * MiB
SMALL = 1 * MiB
REGION = {name: i * MiB for i, name in enumerate([
    "t3", "t8", "t12", "t14", "pipeline", "disc",
], start=1)}


def connect(server: Server, name: str = "disk", structured: bool = True,
            meta: bool = True) -> RawClient:
    c = RawClient(server.socket)
    c.handshake()
    c.go(name, structured=structured, meta=meta)
    return c


# -- T1 -------------------------------------------------------------------------------------


def test_t1_flags_match_features(server: Server, ro_server: Server) -> None:
    result = run_libnbd("""
        out = {}
        for label, sock, structured in params["cases"]:
            h = handle(opt_mode=False, structured=structured)
            h.connect_unix(sock)
            out[label] = dict(
                ro=h.is_read_only(), flush=h.can_flush(), fua=h.can_fua(), trim=h.can_trim(),
                zero=h.can_zero(), fast_zero=h.can_fast_zero(), df=h.can_df(),
                multi=h.can_multi_conn(), cache=h.can_cache(), rot=h.is_rotational(),
                sr=h.get_structured_replies_negotiated())
            h.shutdown()
        result = out
    """, cases=[("rw", server.socket, True), ("rw-simple", server.socket, False),
                ("ro", ro_server.socket, True)])
    # A memory export implements everything; DF only with structured replies.
    assert result["rw"] == dict(ro=False, flush=True, fua=True, trim=True, zero=True,
                                fast_zero=True, df=True, multi=True, cache=True, rot=False,
                                sr=True)
    assert result["rw-simple"]["df"] is False and result["rw-simple"]["sr"] is False
    ro = result["ro"]
    assert ro["ro"] and not (ro["trim"] or ro["zero"] or ro["fast_zero"] or ro["fua"])
    assert ro["flush"] and ro["df"]


def test_t1_raw_flags_consistent(server: Server, ro_server: Server) -> None:
    for srv, structured in ((server, True), (server, False), (ro_server, True)):
        with RawClient(srv.socket) as c:
            c.handshake()
            _, tflags = c.go("disk", structured=structured, meta=structured)
        assert tflags & p.TFLAG_HAS_FLAGS
        assert bool(tflags & p.TFLAG_SEND_DF) == structured
        if tflags & p.TFLAG_SEND_FAST_ZERO:
            assert tflags & p.TFLAG_SEND_WRITE_ZEROES
        assert tflags >> 12 == 0 and not tflags & (1 << 9), f"unknown flags {tflags:#x}"


# -- T2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [0, 0x25609514, p.SIMPLE_REPLY_MAGIC, 0xFFFFFFFF])
def test_t2_bad_request_magic_disconnects(server: Server, magic: int) -> None:
    with connect(server) as c:
        c.send_unless_closed(struct.pack(">IHHQQI", magic, 0, p.CMD_READ, 1, 0, 512))
        assert c.is_closed()
    assert server.alive()


def test_t2_bad_magic_after_good_requests(server: Server) -> None:
    """Requests before the bad header are still answered; then the server hangs up."""
    with connect(server) as c:
        c.send_request(p.CMD_READ, 7, 0, 512)
        c.send_unless_closed(b"\x00" * 28)
        assert c.replies(1)[7].errno == 0
        assert c.is_closed()


# -- T3 -------------------------------------------------------------------------------------


def test_t3_pipelined_mixed_requests_and_cookies(server: Server) -> None:
    base = REGION["t3"]
    data = os.urandom(65536)
    with connect(server) as c:
        # Pipelined, all sent before any reply is read, with extreme cookies.
        c.send_request(p.CMD_WRITE, 0, base, len(data), payload=data)
        c.send_request(p.CMD_FLUSH, 2**64 - 1)
        c.send_request(p.CMD_READ, 0x8000_0000_0000_0000, base, len(data))
        c.send_request(p.CMD_WRITE_ZEROES, 3, base + 65536, 4096)
        c.send_request(p.CMD_BLOCK_STATUS, 4, base, 65536 + 4096)
        c.send_request(p.CMD_CACHE, 5, base, 4096)
        c.send_request(p.CMD_TRIM, 6, base + 2 * 65536, 4096)
        c.send_request(p.CMD_READ, 99, DISK, 1)  # fails, in the middle of good ones
        c.send_request(p.CMD_READ, 8, base, 4096)
        replies = c.replies(9)
        assert set(replies) == {0, 2**64 - 1, 0x8000_0000_0000_0000, 3, 4, 5, 6, 99, 8}
        assert read_data(replies[0x8000_0000_0000_0000], base, len(data)) == data
        assert read_data(replies[8], base, 4096) == data[:4096]
        assert replies[99].errno == p.NBD_EINVAL
        assert all(r.errno == 0 for k, r in replies.items() if k != 99)
        # Cookies may be reused once their request completed.
        for _ in range(3):
            c.send_request(p.CMD_READ, 0, base, 16)
            assert read_data(c.replies(1)[0], base, 16) == data[:16]


def test_t3_many_in_flight(server: Server) -> None:
    """More requests in flight than the server's per-connection limit (reading pauses)."""
    base = REGION["pipeline"]
    with connect(server, structured=False) as c:
        c.send(b"".join(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, i,
                                    base + 16 * (i % 4096), 16) + i.to_bytes(16, "big")
                        for i in range(2000)))
        for i in range(2000):
            c.pending[i] = (p.CMD_WRITE, 16)
        replies = c.replies(2000)
        assert all(r.errno == 0 for r in replies.values())
        assert c.read(base + 16 * 100, 16) == (100).to_bytes(16, "big")


# -- T4 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
def test_t4_past_end(server: Server, structured: bool) -> None:
    with connect(server, "small", structured=structured, meta=structured) as c:
        c.request(p.CMD_WRITE, SMALL - 4096, 4096, payload=b"\xaa" * 4096)
        cases = [(p.CMD_READ, SMALL - 512, 1024, p.NBD_EINVAL),
                 (p.CMD_READ, SMALL, 1, p.NBD_EINVAL),
                 (p.CMD_READ, 2**64 - 512, 1024, p.NBD_EINVAL),
                 (p.CMD_TRIM, SMALL - 512, 1024, p.NBD_EINVAL),
                 (p.CMD_CACHE, SMALL, 4096, p.NBD_EINVAL),
                 (p.CMD_WRITE, SMALL - 512, 1024, p.NBD_ENOSPC),
                 (p.CMD_WRITE, 2**63, 512, p.NBD_ENOSPC),
                 (p.CMD_WRITE_ZEROES, SMALL - 512, 1024, p.NBD_ENOSPC)]
        if structured:
            cases.append((p.CMD_BLOCK_STATUS, SMALL, 512, p.NBD_EINVAL))
        for cmd, offset, length, expected in cases:
            reply = c.request(cmd, offset, length)
            assert reply.errno == expected, (p.CMD_NAMES[cmd], offset, length, reply)
            if structured and cmd in (p.CMD_READ, p.CMD_BLOCK_STATUS):
                assert not reply.simple, "structured READ errors must be chunks"
        assert c.read(SMALL - 4096, 4096) == b"\xaa" * 4096  # data intact


def test_t4_libnbd_past_end(server: Server) -> None:
    result = run_libnbd("""
        h = handle(opt_mode=False)
        h.connect_uri(params["uri"])
        size = h.get_size()
        result = dict(
            read=err(h.pread, 1024, size - 512), trim=err(h.trim, 1024, size - 512),
            cache=err(h.cache, 1024, size), write=err(h.pwrite, b"x" * 1024, size - 512),
            zero=err(h.zero, 1024, size - 512),
            bs=err(h.block_status, 512, size, lambda *a: 0))
    """, uri=server.uri("small"))
    assert result == dict(read=22, trim=22, cache=22, write=28, zero=28, bs=22)


# -- T5 -------------------------------------------------------------------------------------


def test_t5_read_only_eperm_and_payload_drained(ro_server: Server) -> None:
    payload = b"\x55" * 65536
    with connect(ro_server) as c:
        original = c.read(0, 65536)
        # FUA is not advertised read-only and 0x80 is unknown: a flag's EINVAL comes first.
        expected = {(p.CMD_WRITE, 0): p.NBD_EPERM, (p.CMD_WRITE, p.CMD_FLAG_FUA): p.NBD_EINVAL,
                    (p.CMD_TRIM, 0): p.NBD_EPERM, (p.CMD_WRITE_ZEROES, 0): p.NBD_EPERM,
                    (p.CMD_WRITE, 0x80): p.NBD_EINVAL}
        got = {}
        for cmd, flags in expected:
            got[cmd, flags] = c.request(cmd, 0, 65536, flags,
                                        payload=payload if cmd == p.CMD_WRITE else None).errno
        assert got == expected
        # The payloads were drained: this request is parsed from the right place.
        assert c.read(0, 65536) == original
        assert c.request(p.CMD_FLUSH).errno == 0


def test_t5_libnbd_read_only(ro_server: Server) -> None:
    result = run_libnbd("""
        h = handle(opt_mode=False)
        h.connect_uri(params["uri"])
        result = [h.is_read_only(), err(h.pwrite, b"x" * 512, 0), err(h.trim, 512, 0),
                  err(h.zero, 512, 0), err(h.pread, 512, 0), err(h.flush)]
    """, uri=ro_server.uri("disk"))
    assert result == [True, 1, 1, 1, 0, 0]


# -- T6 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
def test_t6_unknown_and_misused(server: Server, structured: bool) -> None:
    with connect(server, structured=structured, meta=structured) as c:
        cases = [
            (p.CMD_DISC + 6, 0, 0, 512),  # 8: RESIZE, not offered
            (99, 0, 0, 512),
            (0xFFFF, 0, 0, 0),
            (p.CMD_READ, 0x80, 0, 512),  # unknown flag
            (p.CMD_READ, 1 << 5, 0, 512),  # PAYLOAD_LEN without extended headers
            (p.CMD_READ, 0x8000, 0, 512),
            (p.CMD_READ, p.CMD_FLAG_NO_HOLE, 0, 512),  # flag on the wrong command
            (p.CMD_READ, p.CMD_FLAG_REQ_ONE, 0, 512),
            (p.CMD_TRIM, p.CMD_FLAG_FAST_ZERO, 0, 512),
            (p.CMD_FLUSH, p.CMD_FLAG_DF, 0, 0),
            (p.CMD_FLUSH, 0, 0, 512),  # FLUSH with a length
            (p.CMD_FLUSH, 0, 512, 0),
        ]
        if not structured:
            cases += [(p.CMD_READ, p.CMD_FLAG_DF, 0, 512),  # DF was not advertised
                      (p.CMD_BLOCK_STATUS, 0, 0, 512)]  # no context negotiated
        for cookie, (cmd, flags, offset, length) in enumerate(cases):
            reply = c.request(cmd, offset, length, flags, cookie=cookie)
            assert reply.errno == p.NBD_EINVAL, (cmd, hex(flags), offset, length, reply)
        assert len(c.read(0, 512)) == 512  # still in sync


def test_t6_unadvertised_flags(ro_server: Server) -> None:
    # FUA is not advertised on a read-only export: using it is EINVAL even on a READ.
    with connect(ro_server) as c:
        assert c.request(p.CMD_READ, 0, 512, p.CMD_FLAG_FUA).errno == p.NBD_EINVAL
        # Unadvertised FAST_ZERO: the flag's EINVAL before the read-only EPERM.
        assert c.request(p.CMD_WRITE_ZEROES, 0, 512, p.CMD_FLAG_FAST_ZERO).errno == p.NBD_EINVAL


def test_t6_libnbd_unknown_flags(server: Server) -> None:
    result = run_libnbd("""
        h = handle(opt_mode=False)
        h.connect_uri(params["uri"])
        result = [err(h.pread, 512, 0, flags=0x40), err(h.flush, flags=nbd.CMD_FLAG_REQ_ONE),
                  err(h.trim, 512, 0, flags=nbd.CMD_FLAG_DF), err(h.pread, 512, 0)]
    """, uri=server.uri("disk"))
    assert result == [22, 22, 22, 0]


# -- T7 -------------------------------------------------------------------------------------


def test_t7_invalid_write_then_valid(server: Server) -> None:
    good = os.urandom(4096)
    with connect(server, "small") as c:
        invalid = [  # offset, length, flags, the errno
            (SMALL - 100, 4096, 0, p.NBD_ENOSPC),  # past the end
            (0, 4096, 0x80, p.NBD_EINVAL),  # unknown flag
            (0, 4096, p.CMD_FLAG_DF, p.NBD_EINVAL),  # DF on a WRITE
            (0, 33 * MiB, 0, p.NBD_ENOSPC),  # over the maximum payload and the end, drained
        ]
        got = []
        for offset, length, flags, _ in invalid:
            # The payload looks like request headers: a server that did not drain it
            # would parse them (and hang up on the magic or answer unknown cookies).
            fake = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, 0xDEAD, 0, 4)
            payload = (fake * (length // len(fake) + 1))[:length]
            got.append(c.request(p.CMD_WRITE, offset, length, flags, payload=payload).errno)
            c.request(p.CMD_WRITE, 0, 4096, payload=good)
            assert c.read(0, 4096) == good
        assert got == [errno for *_, errno in invalid]


def test_t7_write_beyond_drain_limit_disconnects(server: Server) -> None:
    """Documented: a WRITE payload over 128 MiB cannot be drained; the connection drops."""
    with connect(server) as c:
        c.send_unless_closed(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0,
                                         0xFFFFFFFF))
        assert c.is_closed()


# -- T8 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
def test_t8_zero_length_requests(server: Server, structured: bool) -> None:
    base = REGION["t8"]
    with connect(server, structured=structured, meta=structured) as c:
        got = {}
        for cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_CACHE):
            reply = c.request(cmd, base, 0)
            got[p.CMD_NAMES[cmd]] = reply.errno
            if cmd == p.CMD_READ and structured and reply.errno == 0:
                assert reply.chunks[-1].flags & p.REPLY_FLAG_DONE
        assert got == dict.fromkeys(got, 0), got
        if structured:
            assert c.request(p.CMD_BLOCK_STATUS, base, 0).errno == p.NBD_EINVAL
        # Zero length at the very end is in range.
        assert c.request(p.CMD_READ, DISK, 0).errno == 0
        assert len(c.read(base, 512)) == 512


# -- T9 -------------------------------------------------------------------------------------


def test_t9_oversize(server: Server) -> None:
    with connect(server) as c:
        # Above the advertised 32 MiB is served too, as by nbdkit and nbd-server (clients
        # that used EXPORT_NAME never saw the maximum); tests/nbd/test_bounds.py has the
        # hard limit of 64 MiB.
        assert c.request(p.CMD_READ, 0, 32 * MiB + 1).errno == 0
        reply = c.request(p.CMD_READ, 0, 32 * MiB + 1, p.CMD_FLAG_DF)
        assert reply.errno == 0 and len(reply.chunks) == 1
        # Exactly the maximum works, as one chunk with DF.
        reply = c.request(p.CMD_READ, 0, 32 * MiB, p.CMD_FLAG_DF)
        assert reply.errno == 0 and len(reply.chunks) == 1
        # TRIM/WRITE_ZEROES/BLOCK_STATUS carry no payload: the maximum does not limit them.
        assert c.request(p.CMD_WRITE_ZEROES, 16 * MiB, 48 * MiB).errno == 0
        assert c.request(p.CMD_BLOCK_STATUS, 0, DISK).errno == 0


# -- T10 ------------------------------------------------------------------------------------


def test_t10_structured_read_holes_and_data(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=8M")
    with connect(srv) as c:
        data = os.urandom(65536)
        c.request(p.CMD_WRITE, MiB, len(data), payload=data)
        reply = c.request(p.CMD_READ, 0, 4 * MiB)
        types = [ch.chunk_type for ch in reply.chunks]
        assert types == [p.REPLY_TYPE_OFFSET_HOLE, p.REPLY_TYPE_OFFSET_DATA,
                         p.REPLY_TYPE_OFFSET_HOLE], types
        got = read_data(reply, 0, 4 * MiB)  # checks bounds, overlap, cover, DONE last
        assert got[MiB:MiB + len(data)] == data
        assert got.count(0, 0, MiB) == MiB
        # A hole-only read is one OFFSET_HOLE chunk; a read inside data is one DATA chunk.
        [hole] = c.request(p.CMD_READ, 5 * MiB, 4096).chunks
        assert hole.chunk_type == p.REPLY_TYPE_OFFSET_HOLE and hole.flags & 1
        assert struct.unpack(">QI", hole.payload) == (5 * MiB, 4096)
        [one] = c.request(p.CMD_READ, MiB + 100, 1000).chunks
        assert one.chunk_type == p.REPLY_TYPE_OFFSET_DATA
        assert one.payload == struct.pack(">Q", MiB + 100) + data[100:1100]


def test_t10_df_single_chunk(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=8M")
    with connect(srv) as c:
        c.request(p.CMD_WRITE, MiB, 4096, payload=b"\x11" * 4096)
        reply = c.request(p.CMD_READ, 0, 4 * MiB, p.CMD_FLAG_DF)
        assert len(reply.chunks) == 1
        [chunk] = reply.chunks
        # Data in it: one OFFSET_DATA chunk (a hole chunk could not carry it).
        assert chunk.flags & p.REPLY_FLAG_DONE and chunk.chunk_type == p.REPLY_TYPE_OFFSET_DATA
        got = read_data(reply, 0, 4 * MiB)
        assert got[MiB:MiB + 4096] == b"\x11" * 4096


def test_t10_error_is_a_chunk(server: Server) -> None:
    with connect(server) as c:
        reply = c.request(p.CMD_READ, DISK - 1, 2)
        assert not reply.simple
        [chunk] = reply.chunks
        assert chunk.chunk_type == p.REPLY_TYPE_ERROR, chunk.chunk_type  # the whole request
        assert chunk.flags & p.REPLY_FLAG_DONE
        error, msg_len = struct.unpack_from(">IH", chunk.payload)
        assert error == p.NBD_EINVAL
        assert len(chunk.payload) == 6 + msg_len + (8 if chunk.chunk_type & 2 else 0)
        chunk.payload[6:6 + msg_len].decode("utf-8")


def test_t10_libnbd_structured_read(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=4M")
    result = run_libnbd("""
        h = handle(opt_mode=False)
        h.connect_uri(params["uri"])
        h.pwrite(b"\\x42" * 8192, 65536)
        seen = []
        def chunk(buf, offset, status, error):
            seen.append([offset, len(buf), status])
            return 0
        buf = h.pread_structured(1 << 20, 0, chunk)
        df = []
        h.pread_structured(1 << 20, 0, lambda b, o, s, e: df.append([o, len(b), s]) or 0,
                           flags=nbd.CMD_FLAG_DF)
        result = dict(seen=seen, df=df, data=buf[65536:65536 + 8192] == b"\\x42" * 8192,
                      hole=nbd.READ_HOLE, rdata=nbd.READ_DATA)
    """, uri=srv.uri("disk"))
    seen = result["seen"]
    assert result["data"]
    assert [s for _, _, s in seen].count(result["hole"]) >= 1
    assert sorted((o, n) for o, n, _ in seen)[0][0] == 0
    assert sum(n for _, n, _ in seen) == MiB
    assert len(result["df"]) == 1


# -- T11 ------------------------------------------------------------------------------------


def test_t11_block_status(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=8M")
    with connect(srv) as c:
        c.request(p.CMD_WRITE, MiB, 2 * MiB, payload=b"\x01" * (2 * MiB))
        ctx, extents = block_status(c.request(p.CMD_BLOCK_STATUS, 0, 8 * MiB))
        assert ctx == 1  # the id SET_META_CONTEXT gave base:allocation
        assert extents == [(MiB, 3), (2 * MiB, 0), (5 * MiB, 3)]
        # REQ_ONE: exactly one extent, not past the request.
        _, [one] = block_status(c.request(p.CMD_BLOCK_STATUS, MiB + 512, MiB,
                                          p.CMD_FLAG_REQ_ONE))
        assert one == (MiB, 0)
        _, [one] = block_status(c.request(p.CMD_BLOCK_STATUS, 0, 8 * MiB, p.CMD_FLAG_REQ_ONE))
        assert one == (MiB, 3)
        # After TRIM and WRITE_ZEROES the ranges read as zero.
        c.request(p.CMD_TRIM, MiB, MiB)
        c.request(p.CMD_WRITE_ZEROES, 2 * MiB + 65536, 65536)
        _, extents = block_status(c.request(p.CMD_BLOCK_STATUS, MiB, 2 * MiB))
        assert sum(n for n, _ in extents[:-1]) < 2 * MiB
        pos = MiB
        for n, flags in extents:
            assert n > 0 and flags & ~3 == 0
            want_zero = pos < 2 * MiB or 2 * MiB + 65536 <= pos < 2 * MiB + 131072
            if want_zero:
                assert flags & 2, (pos, n, flags)
            pos += n
        # Sanity: every extent claimed zero really reads as zero.
        data = c.read(MiB, 2 * MiB)
        pos = 0
        for n, flags in extents:
            if flags & 2:
                assert data[pos:pos + n].count(0) == min(n, len(data) - pos)
            pos += n


def test_t11_libnbd_block_status(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=4M")
    result = run_libnbd("""
        h = handle(opt_mode=False)
        h.connect_uri(params["uri"])
        h.pwrite(b"\\x01" * 4096, 1 << 20)
        out = []
        h.block_status(4 << 20, 0, lambda ctx, off, ents, e: out.append([ctx, off, ents]) or 0)
        one = []
        h.block_status(4 << 20, 0, lambda ctx, off, ents, e: one.append(ents) or 0,
                       flags=nbd.CMD_FLAG_REQ_ONE)
        result = [out, one]
    """, uri=srv.uri("disk"))
    [[ctx, offset, entries]], [one] = result
    assert ctx == "base:allocation" and offset == 0
    assert sum(entries[0::2]) >= 4 * MiB
    assert len(one) == 2 and one[1] == 3 and one[0] <= 4 * MiB


# -- T12 ------------------------------------------------------------------------------------


def test_t12_write_zeroes(server: Server) -> None:
    base = REGION["t12"]
    with connect(server) as c:
        for flags in (0, p.CMD_FLAG_NO_HOLE, p.CMD_FLAG_FUA,
                      p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FUA):
            c.request(p.CMD_WRITE, base, 65536, payload=b"\xff" * 65536)
            assert c.request(p.CMD_WRITE_ZEROES, base + 4096, 8192, flags).errno == 0
            got = c.read(base, 65536)
            assert got == b"\xff" * 4096 + bytes(8192) + b"\xff" * (65536 - 12288)
        # FAST_ZERO: success (and zeroes) or ENOTSUP with the data untouched.
        c.request(p.CMD_WRITE, base, 65536, payload=b"\xee" * 65536)
        reply = c.request(p.CMD_WRITE_ZEROES, base, 65536, p.CMD_FLAG_FAST_ZERO)
        if reply.errno == 0:
            assert c.read(base, 65536) == bytes(65536)
        else:
            assert reply.errno == p.NBD_ENOTSUP
            assert c.read(base, 65536) == b"\xee" * 65536
        # Unaligned zeroing inside a page keeps its neighbours.
        c.request(p.CMD_WRITE, base, 65536, payload=b"\xdd" * 65536)
        c.request(p.CMD_WRITE_ZEROES, base + 1, 3)
        assert c.read(base, 8) == b"\xdd" + bytes(3) + b"\xdd" * 4


# -- T14 ------------------------------------------------------------------------------------


def test_t14_multi_conn_visibility(server: Server) -> None:
    base = REGION["t14"]
    data = os.urandom(4096)
    with connect(server) as a, connect(server) as b:
        assert a.request(p.CMD_WRITE, base, 4096, payload=data).errno == 0
        assert a.request(p.CMD_FLUSH).errno == 0
        assert b.read(base, 4096) == data
        assert b.request(p.CMD_WRITE, base, 4096, p.CMD_FLAG_FUA,
                         payload=data[::-1]).errno == 0
        assert a.read(base, 4096) == data[::-1]


# -- T15 (DISC; server shutdown is in test_shutdown.py) -------------------------------------


def test_t15_disc_with_requests_in_flight(server: Server) -> None:
    base = REGION["disc"]
    data = os.urandom(MiB)
    with connect(server) as c:
        for i in range(8):
            c.send_request(p.CMD_WRITE, i, base, MiB, payload=data)
        c.send_request(p.CMD_READ, 100, base, MiB)
        c.send(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_DISC, 200, 0, 0))
        replies = c.replies(9)  # every request before DISC is answered
        assert all(r.errno == 0 for r in replies.values())
        assert read_data(replies[100], base, MiB) == data
        assert c.is_closed()
    with connect(server) as c:
        assert c.read(base, MiB) == data


def test_t15_requests_after_disc_are_ignored(server: Server) -> None:
    with connect(server) as c:
        c.send(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_DISC, 1, 0, 0)
               + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, 2, 0, 512))
        assert c.is_closed()


# -- sizes ----------------------------------------------------------------------------------


def test_huge_sparse_export(start_server: StartServer) -> None:
    """64-bit offsets: a 1 TiB export, data beyond 4 GiB and near the end."""
    srv = start_server("--memory", "big=1T")
    size = 1 << 40
    with connect(srv, "big") as c:
        for offset in (5 << 30, size - 4096, (1 << 32) - 2):
            data = os.urandom(4096)
            assert c.request(p.CMD_WRITE, offset, 4096, payload=data).errno == 0
            assert c.read(offset, 4096) == data
        _, extents = block_status(c.request(p.CMD_BLOCK_STATUS, 0, 0xFFFFFFFF & ~511))
        assert extents[0] == ((1 << 32) - 32768, 3)  # the hole before the first page
        assert c.request(p.CMD_READ, size - 1, 2).errno == p.NBD_EINVAL
        assert c.request(p.CMD_WRITE_ZEROES, 0, 0xFFFFF000).errno == 0


def test_size_not_a_multiple_of_512(start_server: StartServer) -> None:
    srv = start_server("--memory", "odd=1000")
    with connect(srv, "odd") as c:
        assert c.request(p.CMD_WRITE, 990, 10, payload=b"0123456789").errno == 0
        assert c.read(0, 1000)[990:] == b"0123456789"
        assert c.request(p.CMD_READ, 999, 2).errno == p.NBD_EINVAL
        assert c.request(p.CMD_WRITE, 999, 2, payload=b"xx").errno == p.NBD_ENOSPC
        _, extents = block_status(c.request(p.CMD_BLOCK_STATUS, 0, 1000))
        assert sum(n for n, _ in extents) >= 1000


def test_client_not_reading_replies_bounds_server_memory(start_server: StartServer) -> None:
    """A client that pipelines far more READ data than it reads must not make the server
    queue it all: the server stops parsing until the client catches up."""
    srv = start_server("--memory", "disk=64M")
    count, size = 64, 32 * MiB  # 2 GiB of replies
    with connect(srv, structured=False) as c:
        c.request(p.CMD_WRITE, 0, size, payload=b"\x01" * size)
        c.send(b"".join(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, i, 0, size)
                        for i in range(count)))
        deadline = time.monotonic() + 2
        peak = 0
        while time.monotonic() < deadline:
            status = Path(f"/proc/{srv.proc.pid}/status").read_text()
            rss = int(status.split("VmRSS:")[1].split()[0]) * 1024
            peak = max(peak, rss)
            time.sleep(0.05)
        assert peak < 512 * MiB, f"server RSS reached {peak >> 20} MiB"
        # Then every reply arrives, intact.
        c.sock.settimeout(60)
        seen = set()
        for _ in range(count):
            header = c.recv_exact(16)
            magic, error, cookie = struct.unpack(">IIQ", header)
            assert magic == p.SIMPLE_REPLY_MAGIC and error == 0
            seen.add(cookie)
            view = memoryview(bytearray(size))
            got = 0
            while got < size:
                n = c.sock.recv_into(view[got:])
                assert n
                got += n
            assert view[0] == 1 and view[-1] == 1
        assert seen == set(range(count))
