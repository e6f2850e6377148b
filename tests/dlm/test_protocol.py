"""The wire format (`minidisk.dlm.protocol`) and what the service answers on a raw socket:
the binary frames round-trip, and the GRANTED reply is used only when a client asked for it
(a client that did not -- an older one -- still gets OK followed by GRANT)."""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.dlm.conftest import Server

from minidisk.dlm import protocol
from minidisk.dlm.messages import (
    BastEvent,
    CancelEvent,
    CancelRequest,
    ConvertRequest,
    Drop,
    ErrorReply,
    GrantedReply,
    GrantEvent,
    Hello,
    Join,
    JsonReply,
    Leave,
    LockRequest,
    OkReply,
    Purge,
    Reply,
    Request,
    StatusRequest,
    UnlockRequest,
)
from minidisk.dlm.modes import Mode
from minidisk.dlm.state import Flag

pytestmark = pytest.mark.timeout(30)


def test_granted_frame_round_trips() -> None:
    decoder = protocol.FrameDecoder()
    lvb = b"v" * protocol.LVB_SIZE
    frames = (protocol.encode_granted(7, 3, 99, 5, 1234, 2, True, False, lvb)
              + protocol.encode_granted(8, 4, 100, 3, 1235, 2, False, True, None))
    # Split anywhere: the decoder waits for whole frames.
    bodies = decoder.feed(frames[:10]) + decoder.feed(frames[10:])
    assert [protocol.decode_reply(body) for body in bodies] == [
        GrantedReply(3, Mode.EX, 1234, 2, True, False, lvb, call_id=7, lkid=99),
        GrantedReply(4, Mode.PR, 1235, 2, False, True, None, call_id=8, lkid=100)]
    assert len(bodies[1]) == protocol.GRANTED_BODY.size


def test_lock_frame_with_cached_names_is_the_same() -> None:
    names = protocol.lock_names("dom", "res")
    assert (protocol.encode_lock_with(1, 2, 5, 0, names)
            == protocol.encode_lock(1, 2, 5, 0, "dom", "res"))
    body = protocol.FrameDecoder().feed(protocol.encode_lock(1, 2, 5, 8, "dom", "rés"))[0]
    assert protocol.decode_request(body) == LockRequest(1, 2, Mode.EX, Flag.PERSISTENT, "dom",
                                                        "rés")


def _one(frame: bytes) -> bytes:
    (body,) = protocol.FrameDecoder().feed(frame)
    return body


_ids = st.integers(1, 0xFFFFFFFF)
_modes = st.sampled_from(list(Mode))
_flags = st.builds(Flag, st.integers(0, 127))
_lvbs = st.none() | st.binary(min_size=protocol.LVB_SIZE, max_size=protocol.LVB_SIZE)
_names = st.text(min_size=1, max_size=64)


@given(st.one_of(
    st.builds(LockRequest, _ids, _ids, _modes, _flags, _names, _names),
    st.builds(ConvertRequest, _ids, _ids, _modes, _flags, _lvbs),
    st.builds(UnlockRequest, _ids, _ids, _flags, _lvbs, st.booleans()),
    st.builds(CancelRequest, _ids, _ids)))
def test_binary_requests_round_trip(request: Request) -> None:
    if type(request) is LockRequest:
        frame = protocol.encode_lock(request.call_id, request.ref, request.mode, request.flags,
                                     request.domain, request.name)
    elif type(request) is ConvertRequest:
        frame = protocol.encode_convert(request.call_id, request.ref, request.mode,
                                        request.flags, request.lvb)
    elif type(request) is UnlockRequest:
        frame = protocol.encode_unlock(request.call_id, request.ref, request.flags,
                                       request.lvb, request.quiet)
    else:
        assert type(request) is CancelRequest
        frame = protocol.encode_cancel(request.call_id, request.ref)
    assert protocol.decode_request(_one(frame)) == request


@given(st.one_of(
    st.builds(OkReply, _ids, st.integers(0, 2**64 - 1)),
    st.builds(ErrorReply, _ids, st.integers(1, 0xFFFF), st.text(max_size=100)),
    st.builds(GrantEvent, _ids, _modes, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
              st.booleans(), st.booleans(), _lvbs),
    st.builds(CancelEvent, _ids, st.none() | _modes),
    st.builds(BastEvent, _ids, _modes)))
def test_binary_replies_and_events_round_trip(reply: Reply) -> None:
    if type(reply) is OkReply:
        frame = protocol.encode_ok(reply.call_id, reply.lkid)
    elif type(reply) is ErrorReply:
        frame = protocol.encode_error(reply.call_id, reply.errno, reply.detail)
    elif type(reply) is GrantEvent:
        frame = protocol.encode_grant(reply.ref, reply.mode, reply.token, reply.lvb_seq,
                                      reply.lvb_valid, reply.demoted, reply.lvb)
    elif type(reply) is CancelEvent:
        frame = protocol.encode_cancelled(reply.ref, reply.mode)
    else:
        assert type(reply) is BastEvent
        frame = protocol.encode_bast(reply.ref, reply.mode)
    assert protocol.decode_reply(_one(frame)) == reply


def test_json_requests_decode_to_their_messages() -> None:
    def decode(message: dict[str, Any]) -> Request:
        return protocol.decode_request(_one(protocol.encode(message)))

    assert decode({"id": 1, "op": "hello", "name": "n", "features": ["a", 3]}) == \
        Hello(1, "n", ("a",))
    assert decode({"id": [1], "op": "hello"}) == Hello([1], "", None)  # ids are echoed
    assert decode({"id": 2, "op": "join", "domain": "d"}) == Join(2, "d")
    assert decode({"id": 3, "op": "leave", "domain": "d"}) == Leave(3, "d")
    assert decode({"id": 4, "op": "drop", "domain": "d", "name": "r"}) == Drop(4, "d", "r")
    assert decode({"id": 5, "op": "status"}) == StatusRequest(5, None)
    assert decode({"id": 6, "op": "status", "after": ["d", "r", 3]}) == \
        StatusRequest(6, ("d", "r", 3))
    assert decode({"id": 7, "op": "purge"}) == Purge(7, None, None)
    assert decode({"id": 8, "op": "purge", "domain": "d", "pid": 42}) == Purge(8, "d", 42)
    for bad in ({"id": 9, "op": "lock", "ref": 1, "domain": "d", "name": "r", "mode": "EX"},
                {"id": 9, "op": "convert", "ref": 1, "mode": "EX"},
                {"id": 9, "op": "unlock", "ref": 1},
                {"id": 9, "op": "cancel", "ref": 1},
                {"id": 9},
                {"id": 9, "op": "join"},
                {"id": 9, "op": "join", "domain": 5},
                {"id": 9, "op": "drop", "domain": "d", "name": None},
                {"id": 9, "op": "status", "after": ["d", "r", "3"]},
                {"id": 9, "op": "purge", "pid": True},
                {"id": 9, "op": "purge", "pid": 1e999}):
        with pytest.raises(protocol.RequestError) as err:
            decode(bad)
        assert err.value.call_id == 9, bad


def test_a_mode_out_of_range_fails_the_request_not_the_connection() -> None:
    with pytest.raises(protocol.RequestError) as err:
        protocol.decode_request(_one(protocol.encode_lock(4, 1, 6, 0, "d", "r")))
    assert err.value.call_id == 4
    with pytest.raises(protocol.RequestError):
        protocol.decode_request(_one(protocol.encode_convert(5, 1, 200, 0, None)))
    # From the service, a mode out of range is not this protocol at all.
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_reply(_one(protocol.encode_bast(1, 6)))
    with pytest.raises(protocol.ProtocolError):  # a reply kind is not a request
        protocol.decode_request(_one(protocol.encode_ok(1)))
    with pytest.raises(protocol.ProtocolError):  # nor a request kind a reply
        protocol.decode_reply(_one(protocol.encode_cancel(1, 1)))


def test_json_replies_decode_to_their_messages() -> None:
    def decode(message: dict[str, Any]) -> Reply:
        return protocol.decode_reply(_one(protocol.encode(message)))

    assert decode({"id": 3, "ok": True, "purged": 2}) == \
        JsonReply(3, {"id": 3, "ok": True, "purged": 2})
    assert decode({"id": 4, "ok": False, "errno": 16, "error": "busy"}) == \
        ErrorReply(4, 16, "busy")
    for bad in ({"id": "4", "ok": True}, {"ok": True}, {"id": 4, "ok": False}):
        with pytest.raises(protocol.ProtocolError):
            decode(bad)


class Raw:
    """A client speaking frames by hand."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(server.path)
        self.decoder = protocol.FrameDecoder()
        self.bodies: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def next(self) -> bytes:
        while not self.bodies:
            data = self.sock.recv(65536)
            assert data, "the service closed the connection"
            self.bodies += self.decoder.feed(data)
        return self.bodies.pop(0)

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(protocol.encode(message))
        return protocol.decode_json(self.next())

    def close(self) -> None:
        self.sock.close()


def test_granted_reply_only_when_asked(dlm_server: Server) -> None:
    old, new = Raw(dlm_server), Raw(dlm_server)
    try:
        reply = old.call({"id": 1, "op": "hello", "name": "old"})
        assert reply["ok"] and reply["features"] == []
        old.send(protocol.encode_lock(2, 1, 5, 0, "d", "r"))
        ok = old.next()
        assert ok[0] == protocol.OK and protocol.OK_BODY.unpack_from(ok)[1] == 2
        grant = old.next()
        assert grant[0] == protocol.GRANT
        assert protocol.GRANT_BODY.unpack_from(grant)[1:3] == (1, 5)      # ref 1, EX
        old.send(protocol.encode_lvb_request(protocol.UNLOCK_HEAD, protocol.UNLOCK, 3, 1, 0,
                                             lvb=b"old"))
        assert old.next()[0] == protocol.OK

        reply = new.call({"id": 1, "op": "hello", "name": "new",
                          "features": ["granted-reply", "something-future"]})
        assert reply["features"] == ["granted-reply"]
        # A hello without the field (what sync() sends) keeps the connection's features.
        assert new.call({"id": 2, "op": "hello", "name": "new"})["features"] == ["granted-reply"]
        new.send(protocol.encode_lock(3, 9, 3, 0, "d", "r"))
        granted = protocol.decode_reply(new.next())
        assert type(granted) is GrantedReply
        assert (granted.call_id, granted.ref, granted.mode, granted.lvb_seq) == (3, 9, Mode.PR, 1)
        assert granted.lkid > 0 and granted.token > 0 and granted.lvb_valid
        assert granted.lvb == b"old".ljust(protocol.LVB_SIZE, b"\0")
        # Not granted at once: OK now, GRANT later, as for anyone.
        old.send(protocol.encode_lock(4, 2, 5, 0, "d", "r"))
        assert old.next()[0] == protocol.OK
        assert protocol.EVENT_BODY.unpack_from(new.next()) == (protocol.BAST, 9, 5)
        new.send(protocol.encode_lvb_request(protocol.UNLOCK_HEAD, protocol.UNLOCK, 4, 9, 0,
                                             lvb=None))
        assert new.next()[0] == protocol.OK
        assert old.next()[0] == protocol.GRANT
    finally:
        old.close()
        new.close()


def test_prompt_unlock_is_handled_before_anyone_s_later_request(dlm_server: Server) -> None:
    """A prompt-unlock connection's UNLOCK, once written, is handled before a request another
    connection sends afterwards -- without its writer waiting for the reply."""
    fast, other = Raw(dlm_server), Raw(dlm_server)
    try:
        assert fast.call({"id": 1, "op": "hello", "name": "fast",
                          "features": ["prompt-unlock"]})["features"] == ["prompt-unlock"]
        assert other.call({"id": 1, "op": "hello", "name": "other"})["features"] == []
        call = 10
        for _ in range(200):
            fast.send(protocol.encode_lock(call, 1, 5, 0, "d", "r"))
            assert fast.next()[0] == protocol.OK
            assert fast.next()[0] == protocol.GRANT
            fast.send(protocol.encode_lvb_request(protocol.UNLOCK_HEAD, protocol.UNLOCK,
                                                  call + 1, 1, 0, lvb=None))
            # No waiting for the unlock's reply: a trylock from elsewhere must succeed now.
            other.send(protocol.encode_lock(call + 2, 1, 5, 1, "d", "r"))   # 1: NOQUEUE
            reply = other.next()
            assert reply[0] == protocol.OK, protocol.ERROR_BODY.unpack_from(reply)
            assert other.next()[0] == protocol.GRANT
            other.send(protocol.encode_lvb_request(protocol.UNLOCK_HEAD, protocol.UNLOCK,
                                                   call + 3, 1, 0, lvb=None))
            assert other.next()[0] == protocol.OK
            assert fast.next()[0] == protocol.OK                              # the unlock's
            call += 4
        # Turned off again by a hello that says so.
        assert fast.call({"id": 2, "op": "hello", "name": "fast", "features": []})[
            "features"] == []
    finally:
        fast.close()
        other.close()


def test_prompt_unlock_overtakes_a_busy_neighbour(dlm_server: Server) -> None:
    """The case that needs the service's help: it is busy with a burst from another
    connection when the unlock and then that connection's trylock arrive. Its next look at
    its sockets finds both ready, the busy one first; without draining the prompt-unlock
    connection first, the trylock would be refused."""
    fast, other = Raw(dlm_server), Raw(dlm_server)
    try:
        fast.call({"id": 1, "op": "hello", "name": "fast", "features": ["prompt-unlock"]})
        other.call({"id": 1, "op": "hello", "name": "other"})
        for round_ in range(5):
            fast.send(protocol.encode_lock(10, 1, 5, 0, "d", "r"))
            assert [fast.next()[0], fast.next()[0]] == [protocol.OK, protocol.GRANT]
            burst = 2000
            other.send(b"".join(protocol.encode({"id": 100 + i, "op": "hello", "name": "o"})
                                for i in range(burst)))
            time.sleep(0.002)  # the service is chewing on the burst
            fast.send(protocol.encode_lvb_request(protocol.UNLOCK_HEAD, protocol.UNLOCK, 11, 1,
                                                  0, lvb=None))
            other.send(protocol.encode_lock(20, 1, 5, 1, "d", "r"))          # NOQUEUE
            for _ in range(burst):
                assert other.next()[0] == protocol.JSON
            reply = other.next()
            assert reply[0] == protocol.OK, (round_, protocol.ERROR_BODY.unpack_from(reply))
            assert other.next()[0] == protocol.GRANT
            other.send(protocol.encode_lvb_request(protocol.UNLOCK_HEAD, protocol.UNLOCK, 21, 1,
                                                   0, lvb=None))
            assert other.next()[0] == protocol.OK
            assert fast.next()[0] == protocol.OK
    finally:
        fast.close()
        other.close()


def test_quiet_unlock_is_answered_only_when_it_fails(dlm_server: Server) -> None:
    raw = Raw(dlm_server)
    try:
        raw.call({"id": 1, "op": "hello", "name": "q", "features": ["prompt-unlock"]})
        raw.send(protocol.encode_lock(2, 1, 5, 0, "d", "r"))
        assert [raw.next()[0], raw.next()[0]] == [protocol.OK, protocol.GRANT]
        raw.send(protocol.encode_lvb_request(protocol.UNLOCK_HEAD, protocol.UNLOCK_QUIET, 3, 1,
                                             0, lvb=b"q"))
        raw.send(protocol.encode_lvb_request(protocol.UNLOCK_HEAD, protocol.UNLOCK_QUIET, 4, 1,
                                             0, lvb=None))            # ref 1 is gone now
        error = raw.next()
        assert error[0] == protocol.ERROR
        assert protocol.ERROR_BODY.unpack_from(error)[1:] == (4, errno.ENOENT)
        # Nothing for request 3; the next reply is for the next request, which sees it done.
        raw.send(protocol.encode_lock(5, 2, 3, 0, "d", "r"))
        body = raw.next()
        assert body[0] == protocol.OK and protocol.OK_BODY.unpack_from(body)[1] == 5
        grant = protocol.decode_reply(raw.next())
        assert type(grant) is GrantEvent and grant.lvb == b"q".ljust(protocol.LVB_SIZE, b"\0")
    finally:
        raw.close()


def test_the_service_answers_a_bad_request_and_keeps_the_connection(dlm_server: Server) -> None:
    raw = Raw(dlm_server)
    try:
        raw.send(protocol.encode_lock(2, 1, 9, 0, "d", "r"))             # no mode 9
        error = protocol.decode_reply(raw.next())
        assert type(error) is ErrorReply and (error.call_id, error.errno) == (2, errno.EINVAL)
        assert "no mode 9" in error.detail
        reply = raw.call({"id": 3, "op": "unlock", "ref": 1})            # JSON form: gone
        assert (reply["id"], reply["ok"], reply["errno"]) == (3, False, errno.EINVAL)
        assert "unknown op 'unlock'" in reply["error"]
        raw.send(protocol.encode_lock(4, 1, 5, 0, "d", "r"))
        assert type(protocol.decode_reply(raw.next())) is OkReply
    finally:
        raw.close()
