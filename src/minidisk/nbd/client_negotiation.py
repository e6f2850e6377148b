"""The client side of the NBD handshake, as pure logic: server bytes in, option bytes and a
`Negotiated` result out. The server side is negotiation.py.

No sockets, no event loop (h11's shape): a driver feeds what the server sent with
`receive_data`, sends whatever `data_to_send` returns, and asks `next_event` what happened.
`next_event` returns None exactly when it needs more bytes, and `wanted` then says how many:
a driver reads that many and no more, so that nothing of the TLS handshake or of
transmission is ever read into a buffer of ours, and a reply's data is allocated only once
its header has been checked (replies.py's `OptionReplies`):

    neg = ClientNegotiation("disk", structured=True)
    while True:
        event = neg.next_event()
        send(neg.data_to_send())
        if event is not None:
            break  # act on it (StartTLS: start TLS, neg.tls_started(), go on)
        neg.receive_data(recv_exactly(neg.wanted))

The plan is fixed by the constructor, in this order: STARTTLS (event `StartTLS`: the driver
wraps the connection, then calls `tls_started`), STRUCTURED_REPLY, SET_META_CONTEXT
base:allocation, then GO with block sizes (event `Negotiated`; EXPORT_NAME when GO is
unsupported and the caller allows it). Without an export the session stays in the option
phase (event `Ready`): the caller sends its own options (`send_option`, event
`OptionResult`) and ends with `abort`. This is how the asyncio client (client.py), kernel
attach (kernel/handshake.py) and the control client negotiate.

Errors follow h11: the server's violations are `ReplyError`s (remote), a refused option the
caller cannot do without is `OptionRefused`, and calling a method in the wrong state is a
`LocalProtocolError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from minidisk.nbd import protocol as p
from minidisk.nbd.replies import (
    NotNBDServer,
    OptionReplies,
    UnexpectedReply,
    export_info,
    parse_meta_context_reply,
)


class State(enum.Enum):
    GREETING = "greeting"  # reading the server's greeting
    REPLY_HEADER = "reply header"  # reading the header of a reply to the option in flight
    REPLY_DATA = "reply data"  # reading that reply's data
    EXPORT_NAME = "export name"  # reading the reply to EXPORT_NAME
    STARTING_TLS = "starting TLS"  # STARTTLS acknowledged: the driver starts TLS
    READY = "ready"  # no option in flight: the caller may send one
    TRANSMISSION = "transmission"  # negotiated: the connection carries requests now
    CLOSED = "closed"  # ABORT sent


_READING = (State.GREETING, State.REPLY_HEADER, State.REPLY_DATA, State.EXPORT_NAME)


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The server accepted STARTTLS: start TLS on the connection, then call `tls_started`."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Handshake done without choosing an export: the option phase is the caller's."""


@dataclass(frozen=True, slots=True)
class OptionResult:
    """The final reply to an option the caller sent: its type and data."""

    option: int
    reply: int
    data: bytes

    @property
    def refused(self) -> bool:
        return bool(self.reply & p.REP_FLAG_ERROR)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the handshake settled: the export and how transmission talks to it."""

    size: int
    tflags: int
    block_size: tuple[int, int, int] | None  # minimum, preferred, maximum (GO only)
    structured: bool
    context_id: int | None  # the server's id for base:allocation, if it chose one


Event = StartTLS | Ready | OptionResult | Negotiated

_OPTION_NAMES = {
    p.OPT_EXPORT_NAME: "EXPORT_NAME", p.OPT_ABORT: "ABORT", p.OPT_LIST: "LIST",
    p.OPT_STARTTLS: "STARTTLS", p.OPT_INFO: "INFO", p.OPT_GO: "GO",
    p.OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY", p.OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    p.OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT", p.OPT_MINIDISK_CONTROL: "MINIDISK_CONTROL",
}
_ERROR_NAMES = {
    p.REP_ERR_UNSUP: "option unsupported", p.REP_ERR_POLICY: "denied by policy",
    p.REP_ERR_INVALID: "invalid option", p.REP_ERR_PLATFORM: "platform",
    p.REP_ERR_TLS_REQD: "TLS required", p.REP_ERR_UNKNOWN: "no such export",
    p.REP_ERR_SHUTDOWN: "shutting down", p.REP_ERR_BLOCK_SIZE_REQD: "block size",
    p.REP_ERR_TOO_BIG: "too big",
}


class OptionRefused(Exception):
    """The server answered an option the handshake needs with an error reply."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.option = option
        self.reply = reply
        self.message = message  # the server's own words (may be empty)
        super().__init__(f"{_OPTION_NAMES.get(option, option)} refused: {self.reason}"
                         + (f" ({message})" if message else ""))

    @property
    def reason(self) -> str:
        return _ERROR_NAMES.get(self.reply, f"error {self.reply & ~p.REP_FLAG_ERROR}")


class LocalProtocolError(Exception):
    """The caller used the negotiation in a state where that is not possible."""


class ClientNegotiation:
    def __init__(self, export: str | None, *, tls: bool = False, structured: bool = False,
                 base_allocation: bool = False, export_name_fallback: bool = False) -> None:
        self.export = export  # None: a control session, which never chooses an export
        self.tls = tls
        self.want_structured = structured
        self.want_base_allocation = base_allocation
        self.export_name_fallback = export_name_fallback
        self.state = State.GREETING
        self.no_zeroes = False
        self.tls_active = False
        self.structured = False
        self.context_id: int | None = None
        self._sent: set[int] = set()  # options of the plan already sent
        self._in: bytearray = bytearray()
        self._out: bytearray = bytearray()
        self._replies: OptionReplies | None = None
        self._callers = False  # the option in flight is the caller's (send_option)
        self._pending: Event | None = None  # an event due without reading (after TLS)
        self._length = 0  # data bytes of the reply whose header came last

    # -- the driver's side --

    @property
    def wanted(self) -> int:
        """Bytes to read before `next_event` can make progress (0: it can now)."""
        return max(0, self._need() - len(self._in))

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state not in _READING:
            raise LocalProtocolError(f"no server bytes expected in state {self.state.value}")
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        """The next thing the driver must act on, or None until `wanted` more bytes come."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        if self.state not in _READING:
            raise LocalProtocolError(f"nothing to read in state {self.state.value}")
        while len(self._in) >= self._need():
            event = self._step()
            if event is not None:
                if self._in:  # e.g. plaintext behind a STARTTLS acknowledgement
                    raise UnexpectedReply(f"{len(self._in)} bytes from the server that no "
                                          f"option asked for ({self.state.value})")
                return event
        return None

    def tls_started(self) -> None:
        """TLS is up: what was negotiated in plaintext is forgotten (proto.md), go on."""
        if self.state is not State.STARTING_TLS:
            raise LocalProtocolError(f"tls_started in state {self.state.value}")
        self.tls_active = True
        self.structured, self.context_id = False, None
        self._pending = self._next_option()

    def send_option(self, option: int, data: bytes = b"") -> None:
        """Send an option of the caller's own (the control channel's); event OptionResult."""
        if self.state is not State.READY:
            raise LocalProtocolError(f"send_option in state {self.state.value}")
        self._send(option, data)
        self._callers = True

    def abort(self) -> None:
        """End the option phase (the server may close without replying: none is read)."""
        if self.state is not State.READY:
            raise LocalProtocolError(f"abort in state {self.state.value}")
        self._out += p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_ABORT, 0)
        self.state = State.CLOSED

    # -- the state machine --

    def _need(self) -> int:
        """Bytes the current state reads in one step (0 outside the reading states)."""
        if self.state is State.GREETING:
            return p.GREETING.size
        if self.state is State.REPLY_HEADER:
            return p.OPTION_REPLY.size
        if self.state is State.REPLY_DATA:
            return self._length
        if self.state is State.EXPORT_NAME:
            return p.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else p.EXPORT_NAME_ZEROES)
        return 0

    def _take(self, n: int) -> bytes:
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def _step(self) -> Event | None:
        """Consume one state's bytes; an event, or None to go on reading."""
        if self.state is State.GREETING:
            return self._greeting(self._take(p.GREETING.size))
        if self.state is State.REPLY_HEADER:
            assert self._replies is not None
            self._length = self._replies.data_length(self._take(p.OPTION_REPLY.size))
            self.state = State.REPLY_DATA
            return None
        if self.state is State.REPLY_DATA:
            assert self._replies is not None
            if not self._replies.add(self._take(self._length)):
                self.state = State.REPLY_HEADER
                return None
            return self._finished(self._replies)
        assert self.state is State.EXPORT_NAME
        size, tflags = p.EXPORT_NAME_REPLY.unpack_from(self._take(self._need()))  # + zeroes
        self.state = State.TRANSMISSION
        return Negotiated(size, tflags, None, self.structured, self.context_id)

    def _greeting(self, data: bytes) -> Event | None:
        magic, opt_magic, flags = p.GREETING.unpack(data)
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NotNBDServer("not a fixed-newstyle NBD server")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise NotNBDServer("the server does not speak fixed newstyle")
        self.no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        self._out += p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE
                                         | (p.FLAG_C_NO_ZEROES if self.no_zeroes else 0))
        return self._next_option()

    def _send(self, option: int, data: bytes) -> None:
        self._out += p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data
        self._replies = OptionReplies(option)
        self._callers = False
        self.state = State.REPLY_HEADER

    def _next_option(self) -> Event | None:
        """Send the plan's next option, or say the handshake is done."""
        for option in _PLAN:
            if option not in self._sent and _WANTED[option](self):
                self._sent.add(option)
                self._send(option, _REQUEST[option](self))
                return None
        self.state = State.READY
        return Ready()

    def _finished(self, replies: OptionReplies) -> Event | None:
        """The final reply to the option in flight has come: act on it."""
        if self._callers:
            self.state = State.READY
            return OptionResult(replies.option, *replies.final)
        return _FINAL[replies.option](self, replies)

    def _starttls_done(self, replies: OptionReplies) -> Event | None:
        _refuse_if(replies)
        self.state = State.STARTING_TLS
        return StartTLS()

    def _structured_done(self, replies: OptionReplies) -> Event | None:
        self.structured = not replies.refused  # refused: simple replies, no block status
        return self._next_option()

    def _meta_context_done(self, replies: OptionReplies) -> Event | None:
        for reply, data in replies.replies:  # a refusal leaves the export without extents
            if reply == p.REP_META_CONTEXT:
                context_id, name = parse_meta_context_reply(data)
                if name == p.META_BASE_ALLOCATION:
                    self.context_id = context_id
        return self._next_option()

    def _go_done(self, replies: OptionReplies) -> Event | None:
        reply, _ = replies.final
        if reply == p.REP_ERR_UNSUP and self.export_name_fallback:
            assert self.export is not None
            name = self.export.encode()
            self._out += p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, len(name)) + name
            self.state = State.EXPORT_NAME
            return None
        _refuse_if(replies)
        info = export_info(replies.replies)
        self.state = State.TRANSMISSION
        return Negotiated(info.size, info.tflags, info.block_size, self.structured,
                          self.context_id)


def _refuse_if(replies: OptionReplies) -> None:
    if replies.refused:
        reply, data = replies.final
        raise OptionRefused(replies.option, reply, data.decode(errors="replace"))


# The plan, as tables: the options in the order they are sent, whether this negotiation
# wants each, its request data, and what its final reply leads to.
_PLAN = (p.OPT_STARTTLS, p.OPT_STRUCTURED_REPLY, p.OPT_SET_META_CONTEXT, p.OPT_GO)
_WANTED: dict[int, Callable[[ClientNegotiation], bool]] = {
    p.OPT_STARTTLS: lambda n: n.tls and not n.tls_active,
    p.OPT_STRUCTURED_REPLY: lambda n: n.want_structured,
    p.OPT_SET_META_CONTEXT: lambda n: n.structured and n.want_base_allocation,
    p.OPT_GO: lambda n: n.export is not None,
}
_REQUEST: dict[int, Callable[[ClientNegotiation], bytes]] = {
    p.OPT_STARTTLS: lambda n: b"",
    p.OPT_STRUCTURED_REPLY: lambda n: b"",
    p.OPT_SET_META_CONTEXT: lambda n: p.meta_context_request(n.export or "",
                                                             [p.META_BASE_ALLOCATION]),
    p.OPT_GO: lambda n: p.info_request(n.export or "", [p.INFO_TYPE_BLOCK_SIZE]),
}
_FINAL: dict[int, Callable[[ClientNegotiation, OptionReplies], Event | None]] = {
    p.OPT_STARTTLS: ClientNegotiation._starttls_done,
    p.OPT_STRUCTURED_REPLY: ClientNegotiation._structured_done,
    p.OPT_SET_META_CONTEXT: ClientNegotiation._meta_context_done,
    p.OPT_GO: ClientNegotiation._go_done,
}
