"""The wire format (`minidisk.dlm.protocol`) and what the service answers on a raw socket:
the binary frames round-trip, and the GRANTED reply is used only when a client asked for it
(a client that did not -- an older one -- still gets OK followed by GRANT)."""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

import pytest

from minidisk.dlm import protocol

from .conftest import Server  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(30)


def test_granted_frame_round_trips() -> None:
    decoder = protocol.FrameDecoder()
    lvb = b"v" * protocol.LVB_SIZE
    frames = (protocol.encode_granted(7, 3, 99, 5, 1234, 2, True, False, lvb)
              + protocol.encode_granted(8, 4, 100, 3, 1235, 2, False, True, None))
    # Split anywhere: the decoder waits for whole frames.
    bodies = decoder.feed(frames[:10]) + decoder.feed(frames[10:])
    assert len(bodies) == 2
    first = protocol.GRANTED_BODY.unpack_from(bodies[0])
    assert first == (protocol.GRANTED, 7, 3, 99, 5, 1234, 2,
                     protocol.GRANT_VALID | protocol.GRANT_LVB)
    assert protocol.trailing_lvb(bodies[0], protocol.GRANTED_BODY.size, 1) == lvb
    second = protocol.GRANTED_BODY.unpack_from(bodies[1])
    assert second == (protocol.GRANTED, 8, 4, 100, 3, 1235, 2, protocol.GRANT_DEMOTED)
    assert len(bodies[1]) == protocol.GRANTED_BODY.size


def test_lock_frame_with_cached_names_is_the_same() -> None:
    names = protocol.lock_names("dom", "res")
    assert (protocol.encode_lock_with(1, 2, 5, 0, names)
            == protocol.encode_lock(1, 2, 5, 0, "dom", "res"))
    body = protocol.FrameDecoder().feed(protocol.encode_lock(1, 2, 5, 8, "dom", "rés"))[0]
    assert protocol.decode_lock(body) == (1, 2, 5, 8, "dom", "rés")


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
        body = new.next()
        assert body[0] == protocol.GRANTED
        _, call_id, ref, lkid, mode, token, seq, bits = protocol.GRANTED_BODY.unpack_from(body)
        assert (call_id, ref, mode, seq) == (3, 9, 3, 1) and lkid > 0 and token > 0
        assert bits & protocol.GRANT_VALID and bits & protocol.GRANT_LVB
        assert protocol.trailing_lvb(body, protocol.GRANTED_BODY.size, 1) == \
            b"old".ljust(protocol.LVB_SIZE, b"\0")
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
        grant = raw.next()
        assert protocol.trailing_lvb(grant, protocol.GRANT_BODY.size, 1) == \
            b"q".ljust(protocol.LVB_SIZE, b"\0")
    finally:
        raw.close()
