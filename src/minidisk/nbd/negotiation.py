"""The server side of the NBD handshake, as pure logic: option events in, replies out.

One `Negotiation` per connection. It knows the TLS policy, the export source and the
peer's identity, and it decides every option reply. It performs no I/O: the connection
(connection.py) writes the replies it returns and carries out its `action` (close, start TLS,
enter transmission). OPT_INFO and OPT_GO share one code path so that they can never
disagree (nbd-server 3.24 reported size 0 on INFO; proto.md requires identical answers).
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from minidisk.nbd import protocol as p
from minidisk.nbd.exports import Access, ExportPolicy, ExportSource, Identity, OpenedExport

log = logging.getLogger(__name__)

# Options a client may send before it picks an export, and as many more per export a LIST
# showed it (nbdkit's MAX_NR_OPTIONS): each may open an export, so there must be an end.
# Control commands are not counted: only permitted peers send them, and a link keeper
# sends them for as long as its link lives.
MAX_OPTIONS = 32


class TLSMode(enum.Enum):
    OFF = "off"  # STARTTLS is refused
    ON = "on"  # TLS offered; plaintext clients still served
    REQUIRE = "require"  # FORCEDTLS: nothing but STARTTLS and ABORT before TLS


class Action(enum.Enum):
    CONTINUE = "continue"
    CLOSE = "close"
    STARTTLS = "starttls"
    TRANSMIT = "transmit"
    CONTROL = "control"  # run a control command, then continue


@dataclass(slots=True)
class Outcome:
    replies: list[bytes] = field(default_factory=list)
    action: Action = Action.CONTINUE
    export: OpenedExport | None = None
    control: bytes = b""  # the JSON payload for Action.CONTROL


@dataclass(frozen=True, slots=True)
class TransmissionTerms:
    """What the handshake settled that transmission goes by: the reply format, the meta
    context, the export's transmission flags."""

    structured: bool
    base_allocation: bool
    tflags: int
    no_zeroes: bool



ControlHandler = Callable[[Identity, bytes], Awaitable[bytes]]


def transmission_flags(export: OpenedExport, read_only: bool, structured: bool) -> int:
    caps = export.device.caps
    ro = read_only or caps.read_only
    flags = p.TFLAG_HAS_FLAGS
    if ro:
        flags |= p.TFLAG_READ_ONLY
    if caps.flush:
        flags |= p.TFLAG_SEND_FLUSH
    if caps.fua and not ro:
        flags |= p.TFLAG_SEND_FUA
    if caps.rotational:
        flags |= p.TFLAG_ROTATIONAL
    if caps.trim and not ro:
        flags |= p.TFLAG_SEND_TRIM
    if caps.zero and not ro:
        flags |= p.TFLAG_SEND_WRITE_ZEROES
        if caps.fast_zero:
            flags |= p.TFLAG_SEND_FAST_ZERO
    if structured:
        flags |= p.TFLAG_SEND_DF
    if caps.multi_conn:
        flags |= p.TFLAG_CAN_MULTI_CONN
    if caps.cache:
        flags |= p.TFLAG_SEND_CACHE
    return flags


class Negotiation:
    def __init__(
        self,
        exports: ExportSource,
        identity: Identity,
        policy: ExportPolicy,
        tls_mode: TLSMode = TLSMode.OFF,
        read_only: bool = False,
        control_allowed: bool = False,
    ) -> None:
        self.exports = exports
        self.identity = identity
        self.policy = policy
        self.tls_mode = tls_mode
        self.read_only = read_only
        self.control_allowed = control_allowed
        self.tls_active = False
        self.no_zeroes = False
        self.structured = False
        self.meta_export: str | None = None  # export the selected contexts belong to
        self.meta_selected = False
        self.shutting_down = False
        self.session: TransmissionTerms | None = None
        self.options_left = MAX_OPTIONS
        self.listed = False  # LIST answers once per connection (as nbdkit)

    # -- entry points --

    def client_flags(self, flags: int) -> Outcome:
        if flags & ~p.KNOWN_CLIENT_FLAGS:
            log.info("client sent unknown flags %#x; closing", flags)
            return Outcome(action=Action.CLOSE)
        if not flags & p.FLAG_C_FIXED_NEWSTYLE:
            log.info("client does not speak fixed newstyle; closing")
            return Outcome(action=Action.CLOSE)
        self.no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
        return Outcome()

    def tls_started(self) -> None:
        """STARTTLS succeeded: everything negotiated in plaintext is forgotten (proto.md)."""
        self.tls_active = True
        self.structured = False
        self.meta_export = None
        self.meta_selected = False

    def option(self, opt: int, data: bytes) -> Outcome:
        if not (opt == p.OPT_MINIDISK_CONTROL and self.control_allowed):
            self.options_left -= 1
            if self.options_left < 0:
                log.info("client sent more than %d options without choosing an export; "
                         "closing", MAX_OPTIONS)
                return Outcome(action=Action.CLOSE)
        if opt == p.OPT_ABORT:
            return Outcome([p.option_reply(opt, p.REP_ACK)], Action.CLOSE)
        if opt == p.OPT_STARTTLS:
            return self._starttls(data)
        if self.tls_mode is TLSMode.REQUIRE and not self.tls_active:
            if opt == p.OPT_EXPORT_NAME:  # cannot be answered with an error: hang up
                return Outcome(action=Action.CLOSE)
            return self._error(opt, p.REP_ERR_TLS_REQD, "TLS is required")
        if self.shutting_down and opt in (p.OPT_INFO, p.OPT_GO, p.OPT_EXPORT_NAME):
            if opt == p.OPT_EXPORT_NAME:
                return Outcome(action=Action.CLOSE)
            return self._error(opt, p.REP_ERR_SHUTDOWN, "server is shutting down")
        handler = _HANDLERS.get(opt)
        if handler is None:
            if opt == p.OPT_MINIDISK_CONTROL and self.control_allowed:
                return Outcome(action=Action.CONTROL, control=data)
            return self._error(opt, p.REP_ERR_UNSUP, f"option {opt} is not supported")
        try:
            return handler(self, opt, data)
        except p.OptionDataError as e:
            return self._error(opt, e.reply, str(e))

    # -- options --

    def _error(self, opt: int, reply: int, message: str) -> Outcome:
        return Outcome([p.option_reply(opt, reply, message.encode()[:p.MAX_STRING])])

    def _starttls(self, data: bytes) -> Outcome:
        opt = p.OPT_STARTTLS
        if data:
            return self._error(opt, p.REP_ERR_INVALID, "STARTTLS takes no data")
        if self.tls_mode is TLSMode.OFF:
            return self._error(opt, p.REP_ERR_UNSUP, "TLS is not configured")
        if self.tls_active:
            return self._error(opt, p.REP_ERR_INVALID, "TLS is already active")
        return Outcome([p.option_reply(opt, p.REP_ACK)], Action.STARTTLS)

    def _open(self, name: str) -> tuple[OpenedExport, bool]:
        """Open an export the identity may see, and say whether it is read-only for it;
        OSError(ENOENT/EACCES) otherwise."""
        export = self.exports.open_export(name)
        access = self.policy(self.identity, export.name)
        if access is Access.DENY:
            export.close()
            raise OSError(errno.EACCES, f"{export.name!r} is not allowed for this client")
        return export, self.read_only or access is Access.READ_ONLY

    def _export_name(self, opt: int, data: bytes) -> Outcome:
        try:
            name = data.decode("utf-8")
            export, read_only = self._open(name)
        except (UnicodeDecodeError, OSError) as e:
            log.info("EXPORT_NAME refused: %s", e)
            return Outcome(action=Action.CLOSE)  # the only answer the spec allows
        tflags = transmission_flags(export, read_only, self.structured)
        reply = p.EXPORT_NAME_REPLY.pack(export.device.size, tflags)
        if not self.no_zeroes:
            reply += bytes(p.EXPORT_NAME_ZEROES)
        self._enter(export, tflags)
        return Outcome([reply], Action.TRANSMIT, export)

    def _list(self, opt: int, data: bytes) -> Outcome:
        if data:
            return self._error(opt, p.REP_ERR_INVALID, "LIST takes no data")
        if self.listed:  # a client asking again and again would multiply the replies
            return self._error(opt, p.REP_ERR_INVALID, "the export list was already sent")
        self.listed = True
        replies = []
        for name in self.exports.export_names():
            if self.policy(self.identity, name) is Access.DENY:
                continue
            raw = name.encode()
            replies.append(p.option_reply(opt, p.REP_SERVER, p.U32.pack(len(raw)) + raw))
        self.options_left += MAX_OPTIONS * len(replies)  # INFO on each export, and more
        replies.append(p.option_reply(opt, p.REP_ACK))
        return Outcome(replies)

    def _info_or_go(self, opt: int, data: bytes) -> Outcome:
        name, infos = p.parse_info_request(data)
        try:
            export, read_only = self._open(name)
        except OSError as e:
            return self._not_opened(opt, e)
        tflags = transmission_flags(export, read_only, self.structured)
        device = export.device
        replies = [p.option_reply(opt, p.REP_INFO, p.INFO_EXPORT.pack(
            p.INFO_TYPE_EXPORT, device.size, tflags))]
        if p.INFO_TYPE_NAME in infos:
            replies.append(p.option_reply(
                opt, p.REP_INFO, p.U16.pack(p.INFO_TYPE_NAME) + export.name.encode()))
        if p.INFO_TYPE_DESCRIPTION in infos and export.description:
            replies.append(p.option_reply(opt, p.REP_INFO, p.U16.pack(
                p.INFO_TYPE_DESCRIPTION) + export.description.encode()[:p.MAX_STRING]))
        bs = device.block_size
        if p.INFO_TYPE_BLOCK_SIZE in infos or bs.minimum > 1:
            replies.append(p.option_reply(opt, p.REP_INFO, p.INFO_BLOCK_SIZE.pack(
                p.INFO_TYPE_BLOCK_SIZE, bs.minimum, bs.preferred, bs.maximum)))
        replies.append(p.option_reply(opt, p.REP_ACK))
        if opt == p.OPT_INFO:
            export.close()
            return Outcome(replies)
        self._enter(export, tflags)
        return Outcome(replies, Action.TRANSMIT, export)

    def _not_opened(self, opt: int, e: OSError) -> Outcome:
        """The reply when `_open` failed: POLICY where the policy said no, else UNKNOWN."""
        reply = p.REP_ERR_POLICY if e.errno == errno.EACCES else p.REP_ERR_UNKNOWN
        return self._error(opt, reply, e.strerror or str(e))

    def _enter(self, export: OpenedExport, tflags: int) -> None:
        base_allocation = (self.structured and self.meta_selected
                           and self.meta_export == export.name)
        self.session = TransmissionTerms(self.structured, base_allocation, tflags,
                                         self.no_zeroes)

    def _structured_reply(self, opt: int, data: bytes) -> Outcome:
        if data:
            return self._error(opt, p.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        if self.structured:
            return self._error(opt, p.REP_ERR_INVALID, "structured replies already negotiated")
        self.structured = True
        return Outcome([p.option_reply(opt, p.REP_ACK)])

    def _meta_context(self, opt: int, data: bytes) -> Outcome:
        setting = opt == p.OPT_SET_META_CONTEXT
        if setting:  # SET replaces the selection even when it fails
            self.meta_export, self.meta_selected = None, False
        if not self.structured:
            return self._error(opt, p.REP_ERR_INVALID, "negotiate STRUCTURED_REPLY first")
        name, queries = p.parse_meta_context_request(data)
        try:
            export, _ = self._open(name)
        except OSError as e:
            return self._not_opened(opt, e)
        export.close()
        if setting:
            matched = p.META_BASE_ALLOCATION in queries
        else:
            matched = not queries or any(q in ("base:", p.META_BASE_ALLOCATION)
                                         for q in queries)
        replies = []
        if matched:
            ctx_id = p.META_CONTEXT_ID if setting else 0
            replies.append(p.option_reply(opt, p.REP_META_CONTEXT, p.U32.pack(ctx_id)
                                          + p.META_BASE_ALLOCATION.encode()))
        if setting:
            # Stored canonical, so that GO with "" or "/name" finds the same export.
            self.meta_export, self.meta_selected = export.name, matched
        replies.append(p.option_reply(opt, p.REP_ACK))
        return Outcome(replies)


_HANDLERS: dict[int, Callable[[Negotiation, int, bytes], Outcome]] = {
    p.OPT_EXPORT_NAME: Negotiation._export_name,
    p.OPT_LIST: Negotiation._list,
    p.OPT_INFO: Negotiation._info_or_go,
    p.OPT_GO: Negotiation._info_or_go,
    p.OPT_STRUCTURED_REPLY: Negotiation._structured_reply,
    p.OPT_LIST_META_CONTEXT: Negotiation._meta_context,
    p.OPT_SET_META_CONTEXT: Negotiation._meta_context,
}
