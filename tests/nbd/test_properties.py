"""Property tests (hypothesis).

* The codec: option streams split anywhere parse back to the same events; INFO/GO and
  meta-context payloads round-trip; arbitrary bytes only ever raise the codec's own errors.
* The server: random pipelined request streams (valid and invalid, cut into random
  segments) get exactly one reply per cookie with the errno and data a model predicts.
* Robustness: random handshakes and random transmission streams never crash the server
  and never disturb another connection served at the same time.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.harness import Server, short_dir
from tests.nbd.conftest import launch
from tests.nbd.nbd_helpers import RawClient, block_status, read_data

from minidisk.nbd import protocol as p

pytestmark = pytest.mark.timeout(180)

KiB = 1024
PROP_SIZE = 256 * KiB
SERVER_SETTINGS = settings(max_examples=60, deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                  HealthCheck.too_slow])

# -- codec ----------------------------------------------------------------------------------

options = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=8)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


@given(flags=st.integers(0, 2**32 - 1), opts=options, cuts=st.lists(st.integers(0, 10**6)))
def test_option_stream_round_trip(flags: int, opts: list[tuple[int, bytes]],
                                  cuts: list[int]) -> None:
    stream = struct.pack(">I", flags) + b"".join(
        p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data for opt, data in opts)
    expected = [p.ClientFlags(flags)] + [p.Option(opt, data) for opt, data in opts]
    lazy = p.HandshakeReader()
    greedy = p.HandshakeReader()
    got_lazy: list[p.HandshakeEvent] = []
    got_greedy: list[p.HandshakeEvent] = []
    for piece in _split(stream, cuts):
        lazy.append(piece)
        while (event := lazy.next_event()) is not None:
            got_lazy.append(event)
        got_greedy += greedy.feed(piece)
    assert got_lazy == expected and got_greedy == expected
    assert lazy.buffered == 0 and lazy.take_rest() == b""


@given(opts=options, rest=st.binary(max_size=100))
def test_reader_stops_where_told(opts: list[tuple[int, bytes]], rest: bytes) -> None:
    """Taking events one at a time leaves what follows (transmission) untouched."""
    stream = struct.pack(">I", 1) + b"".join(
        p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data for opt, data in opts)
    reader = p.HandshakeReader()
    reader.append(stream + rest)
    for _ in range(len(opts) + 1):
        assert reader.next_event() is not None
    assert reader.take_rest() == rest


names = st.text(max_size=64).filter(lambda s: "\x00" not in s)


@given(name=names, infos=st.lists(st.integers(0, 0xFFFF), max_size=20))
def test_info_request_round_trip(name: str, infos: list[int]) -> None:
    assert p.parse_info_request(p.info_request(name, infos)) == (name, infos)


@given(name=names, queries=st.lists(names, max_size=10))
def test_meta_context_request_round_trip(name: str, queries: list[str]) -> None:
    assert p.parse_meta_context_request(p.meta_context_request(name, queries)) == (name, queries)


@given(data=st.binary(max_size=200))
def test_option_parsers_on_garbage(data: bytes) -> None:
    for parse in (p.parse_info_request, p.parse_meta_context_request):
        try:
            parse(data)
        except p.OptionDataError as e:
            assert e.reply in (p.REP_ERR_INVALID, p.REP_ERR_TOO_BIG)


@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 1000), max_size=4))
def test_handshake_reader_on_garbage(data: bytes, cuts: list[int]) -> None:
    reader = p.HandshakeReader()
    try:
        for piece in _split(data, cuts):
            reader.feed(piece)
    except p.ProtocolError:
        pass
    assert reader.buffered < p.OPTION_HEADER.size + p.MAX_OPTION_DATA


@given(fields=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                        st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                        st.integers(0, 2**32 - 1)))
def test_request_header_round_trip(fields: tuple[int, int, int, int, int]) -> None:
    raw = p.REQUEST.pack(p.REQUEST_MAGIC, *fields)
    assert len(raw) == 28
    assert p.REQUEST.unpack(raw) == (p.REQUEST_MAGIC, *fields)


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prop_server() -> Iterator[Server]:
    import shutil

    directory = short_dir()
    server = launch(directory, ["--memory", f"prop={PROP_SIZE}", "--memory", "witness=1M"])
    yield server
    alive = server.alive()
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)
    assert alive, "the server died under random input:\n" + server.log_text()[-3000:]


@pytest.fixture(scope="module")
def witness(prop_server: Server) -> Iterator[RawClient]:
    """A connection that lives through every garbage example and must stay correct."""
    c = RawClient(prop_server.socket)
    c.handshake()
    c.go("witness")
    yield c
    c.close()


def check_witness(c: RawClient, rng: random.Random) -> None:
    offset = rng.randrange(0, (1 << 20) - 512)
    data = rng.randbytes(512)
    assert c.request(p.CMD_WRITE, offset, 512, payload=data).errno == 0
    assert c.read(offset, 512) == data


def drain_until_closed(sock: socket.socket) -> None:
    """Half-close and read until the server closes: by then it has processed everything."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass


# -- random request streams against a model -------------------------------------------------

CMDS = [p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_CACHE, p.CMD_WRITE_ZEROES,
        p.CMD_BLOCK_STATUS, p.CMD_FLUSH, 9, 200]


@st.composite
def requests(draw: st.DrawFn) -> tuple[int, int, int, int]:
    cmd = draw(st.sampled_from(CMDS))
    if draw(st.integers(0, 9)) == 0:  # sometimes past the end
        offset = draw(st.integers(PROP_SIZE - 4 * KiB, PROP_SIZE + KiB))
    else:
        offset = draw(st.integers(0, PROP_SIZE - 1))
    length = draw(st.integers(0, 70 * KiB))
    flags = draw(st.sampled_from([0, 0, 0, p.CMD_FLAG_FUA, p.CMD_FLAG_NO_HOLE,
                                  p.CMD_FLAG_DF, p.CMD_FLAG_REQ_ONE, 0x40]))
    if cmd == p.CMD_FLUSH:
        offset = length = 0
    return cmd, flags, offset, length


def expected_error(cmd: int, flags: int, offset: int, length: int) -> int:
    """What the spec (and research/nbd.md §1.7) requires for a request on `prop`."""
    if cmd not in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_CACHE, p.CMD_WRITE_ZEROES,
                   p.CMD_BLOCK_STATUS, p.CMD_FLUSH):
        return p.NBD_EINVAL
    if flags & 0x40:
        return p.NBD_EINVAL
    if flags & p.CMD_FLAG_NO_HOLE and cmd != p.CMD_WRITE_ZEROES:
        return p.NBD_EINVAL
    if flags & p.CMD_FLAG_DF and cmd != p.CMD_READ:
        return p.NBD_EINVAL
    if flags & p.CMD_FLAG_REQ_ONE and cmd != p.CMD_BLOCK_STATUS:
        return p.NBD_EINVAL
    if offset + length > PROP_SIZE:
        return p.NBD_ENOSPC if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.NBD_EINVAL
    if cmd == p.CMD_BLOCK_STATUS and length == 0:
        return p.NBD_EINVAL
    return 0


@SERVER_SETTINGS
@given(batches=st.lists(st.lists(requests(), min_size=1, max_size=12), min_size=1,
                        max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_random_request_streams(prop_server: Server, batches: list[list[tuple[int, ...]]],
                                seed: int) -> None:
    rng = random.Random(seed)
    with RawClient(prop_server.socket) as c:
        c.handshake()
        c.go("prop")
        assert c.request(p.CMD_WRITE_ZEROES, 0, PROP_SIZE).errno == 0
        model = bytearray(PROP_SIZE)
        known = bytearray(b"\x01" * PROP_SIZE)  # 0 where the content is unspecified
        for batch in batches:
            stream = []
            cookies: dict[int, tuple[int, int, int, int, bytes]] = {}
            touched = bytearray(PROP_SIZE)  # bytes some mutating request of this batch hits
            for i, (cmd, flags, offset, length) in enumerate(batch):
                cookie = rng.choice([i, 2**64 - 1 - i, i << 40])
                payload = rng.randbytes(length) if cmd == p.CMD_WRITE else b""
                cookies[cookie] = (cmd, flags, offset, length, payload)
                c.pending[cookie] = (cmd, length)
                stream.append(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset,
                                             length) + payload)
                if (cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
                        and not expected_error(cmd, flags, offset, length)):
                    touched[offset:offset + length] = b"\x01" * length
            raw = b"".join(stream)
            for piece in _split(raw, [rng.randrange(len(raw) + 1) for _ in range(3)]):
                c.send(piece)
            replies = c.replies(len(batch))
            assert set(replies) == set(cookies)
            # Requests of one batch may run in any order: check reads only where no
            # request of the batch wrote, then apply the batch to the model in order.
            for cookie, (cmd, flags, offset, length, _) in cookies.items():
                reply = replies[cookie]
                want = expected_error(cmd, flags, offset, length)
                assert reply.errno == want, (p.CMD_NAMES.get(cmd, cmd), flags, offset,
                                             length, reply)
                if cmd in (p.CMD_READ, p.CMD_BLOCK_STATUS):
                    assert not reply.simple
                if want:
                    continue
                if cmd == p.CMD_READ:
                    data = read_data(reply, offset, length)
                    if flags & p.CMD_FLAG_DF:
                        assert len(reply.chunks) == 1
                    for i in range(length):
                        if known[offset + i] and not touched[offset + i]:
                            assert data[i] == model[offset + i], offset + i
                elif cmd == p.CMD_BLOCK_STATUS:
                    _, extents = block_status(reply)
                    if flags & p.CMD_FLAG_REQ_ONE:
                        assert len(extents) == 1 and extents[0][0] <= length
                    assert sum(n for n, _ in extents[:-1]) < length
                    pos = offset
                    for n, state in extents:
                        assert n > 0 and state & ~3 == 0
                        if state & 2:  # claimed zero: must be, where we know
                            for b in range(pos, min(pos + n, PROP_SIZE)):
                                assert not known[b] or touched[b] or model[b] == 0
                        pos += n
            for cmd, flags, offset, length, payload in cookies.values():
                if expected_error(cmd, flags, offset, length):
                    continue
                if cmd == p.CMD_WRITE:
                    model[offset:offset + length] = payload
                    known[offset:offset + length] = b"\x01" * length
                elif cmd == p.CMD_WRITE_ZEROES:
                    model[offset:offset + length] = bytes(length)
                    known[offset:offset + length] = b"\x01" * length
                elif cmd == p.CMD_TRIM:  # contents unspecified until rewritten
                    known[offset:offset + length] = bytes(length)
            # Overlapping mutations within one batch have no defined order.
            counts = bytearray(PROP_SIZE)
            for cmd, flags, offset, length, _ in cookies.values():
                if (cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
                        and not expected_error(cmd, flags, offset, length)):
                    for b in range(offset, offset + length):
                        counts[b] = min(counts[b] + 1, 2)
            for b in range(PROP_SIZE):
                if counts[b] > 1:
                    known[b] = 0
            full = c.read(0, PROP_SIZE)
            for b in range(PROP_SIZE):
                if known[b]:
                    assert full[b] == model[b], b


# -- garbage --------------------------------------------------------------------------------

option_numbers = st.one_of(st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 99]),
                           st.integers(0, 2**32 - 1)).filter(
                               lambda o: o != p.OPT_MINIDISK_CONTROL)


@st.composite
def handshakes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    out = [struct.pack(">I", draw(st.sampled_from([1, 3, 0, 2**32 - 1])))]
    for _ in range(draw(st.integers(0, 6))):
        opt = draw(option_numbers)
        data = draw(st.binary(max_size=100))
        declared = draw(st.sampled_from([len(data), len(data), 2**32 - 1, len(data) + 5]))
        magic = p.IHAVEOPT if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
        out.append(struct.pack(">QII", magic, opt, declared) + data)
    return b"".join(out)


@SERVER_SETTINGS
@given(garbage=handshakes(), seed=st.integers(0, 2**32 - 1))
def test_garbage_handshakes(prop_server: Server, witness: RawClient, garbage: bytes,
                            seed: int) -> None:
    with RawClient(prop_server.socket) as c:
        c.greeting()
        c.send_unless_closed(garbage)
        drain_until_closed(c.sock)
    check_witness(witness, random.Random(seed))


@st.composite
def transmissions(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    out = []
    for _ in range(draw(st.integers(1, 10))):
        magic = p.REQUEST_MAGIC if draw(st.integers(0, 19)) else draw(st.integers(0, 2**32 - 1))
        cmd = draw(st.one_of(st.integers(0, 10), st.integers(0, 0xFFFF)))
        flags = draw(st.integers(0, 0xFFFF))
        offset = draw(st.one_of(st.integers(0, PROP_SIZE), st.integers(0, 2**64 - 1)))
        length = draw(st.one_of(st.integers(0, 8192), st.integers(0, 2**32 - 1)))
        payload = b""
        if cmd == p.CMD_WRITE:
            payload = draw(st.binary(min_size=min(length, 200), max_size=min(length, 200)))
        out.append(struct.pack(">IHHQQI", magic, flags, cmd,
                               draw(st.integers(0, 2**64 - 1)), offset, length) + payload)
    return b"".join(out)


@SERVER_SETTINGS
@given(garbage=transmissions(), structured=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_garbage_transmission(prop_server: Server, witness: RawClient, garbage: bytes,
                              structured: bool, seed: int) -> None:
    with RawClient(prop_server.socket) as c:
        c.handshake()
        c.go("prop", structured=structured, meta=structured)
        c.send_unless_closed(garbage)
        drain_until_closed(c.sock)
    check_witness(witness, random.Random(seed))
