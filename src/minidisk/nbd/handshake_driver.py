"""The handshake phase of one NBD connection: negotiation.py driven over its transport.

negotiation.py decides (sans I/O); this feeds it the client's bytes one option at a time,
sends its replies through the connection's reply writer, and carries out its actions:
STARTTLS (nothing pipelined behind it is accepted), a control command, CLOSE, and the
hand-over to transmission, which is the connection's. Options wait while the client does
not read the replies (write back-pressure), and while STARTTLS or a control command runs.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from minidisk.nbd import protocol as p
from minidisk.nbd.exports import Identity
from minidisk.nbd.negotiation import Action, Negotiation, Outcome
from minidisk.nbd.tls import peer_subject

if TYPE_CHECKING:
    from minidisk.nbd.connection import Connection

log = logging.getLogger(__name__)

HANDSHAKE_QUEUED_OUT = 64 * 1024  # option reply bytes queued before they are written out


class HandshakeDriver:
    def __init__(self, conn: Connection, negotiation: Negotiation) -> None:
        self.conn = conn
        self.negotiation = negotiation
        self.reader = p.HandshakeReader()
        self.busy = False  # STARTTLS or a control command in progress: reading pauses
        self.deferred = False  # options left until the client reads the replies

    @property
    def identity(self) -> Identity:
        """The peer as proven so far (updated when TLS starts)."""
        return self.negotiation.identity

    def feed(self, data: memoryview) -> None:
        self.reader.append(data)
        self.next_options()

    def writable(self) -> None:
        """The client reads again: go on with the options it sent meanwhile."""
        if self.deferred:
            self.deferred = False
            self.conn.loop.call_soon(self._resume_options)

    def next_options(self) -> None:
        """Act on the options received, one at a time: after GO the rest is transmission,
        after STARTTLS it is TLS. Stops while the client is not reading the replies."""
        neg = self.negotiation
        replies = self.conn.replies
        while (event := self.reader.next_event()) is not None:
            if isinstance(event, p.ClientFlags):
                outcome = neg.client_flags(event.flags)
            else:
                outcome = neg.option(event.option, event.data)
            if self._carry_out(outcome):
                return
            if replies.out_bytes >= HANDSHAKE_QUEUED_OUT:
                replies.flush()
            if replies.paused:
                self.deferred = True
                return

    def _carry_out(self, outcome: Outcome) -> bool:
        """Write the replies and act; True when no further option may be processed now."""
        conn = self.conn
        conn.replies.send(*outcome.replies)
        if outcome.action is Action.CLOSE:
            conn.hang_up()
            return True
        if outcome.action is Action.STARTTLS:
            if self.reader.buffered:
                # Plaintext sent behind STARTTLS must never be taken as if it had come over
                # TLS (STARTTLS command injection); the client may not pipeline here.
                conn.abort("data pipelined after STARTTLS")
                return True
            self._pause_for(self._start_tls())
            return True
        if outcome.action is Action.CONTROL:
            # A permitted control peer (link keepers hold this connection for the whole
            # link) is the control layer's to bound from here on.
            conn.handshake_done()
            self._pause_for(self._control(outcome.control))
            return True
        if outcome.action is Action.TRANSMIT:
            assert outcome.export is not None and self.negotiation.session is not None
            conn.begin_transmission(outcome.export, self.negotiation.session,
                                    self.reader.take_rest())
            return True
        return False

    def _pause_for(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a handshake step that must finish before the next option is read."""
        conn = self.conn
        self.busy = True
        conn.update_reading()
        task = conn.loop.create_task(coro)
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    def _resume_options(self) -> None:
        self.busy = False
        conn = self.conn
        conn.update_reading()
        if conn.transport is None:
            return
        try:  # options the client pipelined behind the one we just finished
            self.next_options()
        except p.ProtocolError as e:
            conn.abort(str(e))

    async def _start_tls(self) -> None:
        conn = self.conn
        ctx = conn.server.tls_context
        assert ctx is not None and conn.transport is not None
        conn.replies.flush()
        try:
            transport = await conn.loop.start_tls(conn.transport, conn, ctx, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as e:
            log.info("TLS handshake failed: %s", e)
            conn.abort("TLS handshake failed")
            return
        if transport is None:
            return
        conn.tls_transport(transport)
        neg = self.negotiation
        neg.tls_started()
        subject = peer_subject(transport.get_extra_info("ssl_object"))
        neg.identity = dataclasses.replace(neg.identity, subject=subject, tls=True)
        neg.control_allowed = conn.server.offers_control(neg.identity)
        # The identity export policies see; logged so that it can be checked from outside.
        log.debug("TLS established; client certificate subject %s", subject)
        self._resume_options()

    async def _control(self, request: bytes) -> None:
        conn = self.conn
        assert conn.server.control is not None
        result = await conn.server.control(self.negotiation.identity, request)
        conn.replies.send(p.option_reply(p.OPT_MINIDISK_CONTROL, p.REP_MINIDISK_RESULT, result))
        self._resume_options()
