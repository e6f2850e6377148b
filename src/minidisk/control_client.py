"""The control client: JSON commands to a minidisk server, carried in a private NBD option.

A control client connects to the server's own URL, completes the fixed-newstyle greeting,
sends OPT_MINIDISK_CONTROL with ``{"command": NAME, "args": {...}}`` and reads one
REP_MINIDISK_RESULT reply holding ``{"ok": true, "result": {...}}`` or
``{"ok": false, "errno": N, "error": "text"}``; then it sends OPT_ABORT. Riding on the NBD
listener means one URL per server (as rump clients use one RUMP_SERVER) and that TLS and
peer identity apply to control exactly as to data. Other NBD servers answer the option
with ERR_UNSUP, which the client reports as "not a minidisk server".

A leaf above nbd/: the CLI, the link layer's keeper and linker, and the daemon (for the
wire's shared pieces) import it, so none of them imports another for the client. The
server side, the command table, is daemon/control.py. Blocking: CLI commands are one-shot.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import time
from typing import Any

from minidisk.nbd import client_negotiation as cn
from minidisk.nbd import protocol as p
from minidisk.nbd import replies as r
from minidisk.nbd.blocking import negotiate, open_socket
from minidisk.nbd.listen import parse_url
from minidisk.nbd.tls import client_context
from minidisk.nbd.transport import Transport

TLS_ENV = "MINIDISK_TLS_CERTIFICATES"


class ControlError(OSError):
    """A control command that failed, here (connecting, a broken reply) or at the server (the
    errno it answered): an OSError(errno, strerror), so that a caller catching OSError
    catches it too. Printed as its message alone: the CLI's one-line errors."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return self.strerror or ""


def shown(text: str) -> str:
    """Text from the other side in a message: quoted (no forged lines) and cut short."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def connect(url: str, timeout: float = 30.0) -> socket.socket:
    address = parse_url(url)
    if address.kind not in (Transport.UNIX, Transport.TCP):
        raise ControlError(errno.EINVAL, f"cannot reach a server at {url}")
    host = "127.0.0.1" if address.host in ("0.0.0.0", "") else address.host
    try:
        sock = open_socket(address.kind, address.path, host, address.port, timeout)
    except OSError as e:
        raise ControlError(e.errno or errno.EIO,
                           f"cannot connect to {url}: {e.strerror or e}") from None
    return sock


class ControlConnection:
    """One control connection for several commands, in order. `call()` uses one per command;
    a link keeper keeps one open for as long as its link must live (the server ends the link
    when this connection closes).

    Every reply is checked before it is read (ReplyError, as the NBD client does) and is
    awaited for at most the socket's timeout; whatever the server sends, the caller gets a
    ControlError naming the server."""

    def __init__(self, url: str, tls: ssl.SSLContext | None = None,
                 timeout: float = 300.0) -> None:
        self.url = url
        if tls is None and os.environ.get(TLS_ENV):
            # CLI commands speak TLS when told where their certificates are (nbdkit layout:
            # ca-cert.pem, client-cert.pem, client-key.pem).
            tls = client_context(os.environ[TLS_ENV])
        self.sock = connect(url, timeout)
        # The handshake and every command are nbd/client_negotiation.py's option phase.
        self.negotiation = cn.ClientNegotiation(None, tls=tls is not None)
        try:
            event = self._exchange()
            if isinstance(event, cn.StartTLS):
                assert tls is not None
                self.sock = tls.wrap_socket(self.sock)
                self.negotiation.tls_started()
                event = self._exchange()
            assert isinstance(event, cn.Ready)  # the plan has no export
        except BaseException:
            self.sock.close()
            raise

    def call(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"command": command, "args": args or {}}).encode()
        reply, data = self._option(p.OPT_MINIDISK_CONTROL, body)
        if reply == p.REP_ERR_UNSUP:
            raise ControlError(errno.EPERM, f"{self.url} refused control commands "
                               "(not a minidisk server, or not permitted for this client)")
        if reply == p.REP_ERR_TLS_REQD:
            raise ControlError(errno.EPERM, f"{self.url} needs TLS: set {TLS_ENV}=DIR "
                               "(ca-cert.pem, client-cert.pem, client-key.pem)")
        if reply != p.REP_MINIDISK_RESULT:
            raise ControlError(errno.EPROTO, f"{self.url}: control command refused with "
                               f"reply {reply:#x}: {data[:200].decode(errors='replace')!r}")
        return _result(self.url, data)

    def _option(self, option: int, data: bytes) -> tuple[int, bytes]:
        """Send one option; its final reply (type, data)."""
        if self.negotiation.state is not cn.State.READY:  # a command cut short (a signal)
            raise ControlError(errno.EPROTO, f"{self.url}: an earlier command did not "
                               "finish; this connection cannot carry another")
        self.negotiation.send_option(option, data)
        result = self._exchange()
        assert isinstance(result, cn.OptionResult)
        return result.reply, result.data

    def _exchange(self) -> cn.Event:
        """Drive the negotiation to its next event, with one deadline (the socket's timeout)
        for all of the server's bytes; every failure is a ControlError naming the server."""
        timeout = self.sock.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return negotiate(self.negotiation, self.sock, deadline)
        except TimeoutError:
            raise ControlError(errno.ETIMEDOUT,
                               f"{self.url}: no reply within {timeout:g} s") from None
        except cn.OptionRefused as e:  # only STARTTLS is the negotiation's to refuse
            raise ControlError(errno.EPROTO, f"{self.url}: STARTTLS refused: "
                               f"{e.message!r}") from None
        except r.ReplyError as e:
            raise ControlError(errno.EPROTO, f"{self.url}: {e}") from None
        except OSError as e:
            raise ControlError(e.errno or errno.EIO, f"{self.url}: {e.strerror or e}") from None

    def close(self) -> None:
        try:
            if self.negotiation.state is cn.State.READY:
                self.negotiation.abort()
                self.sock.sendall(self.negotiation.data_to_send())
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _result(url: str, data: bytes) -> dict[str, Any]:
    """The result of a REP_MINIDISK_RESULT, or its error as a ControlError."""
    try:
        message = json.loads(data)
    except RecursionError:
        raise ControlError(errno.EPROTO, f"{url}: reply is not JSON (nested too deeply)") from None
    except ValueError:
        raise ControlError(errno.EPROTO, f"{url}: reply is not JSON") from None
    if not isinstance(message, dict):
        raise ControlError(errno.EPROTO, f"{url}: reply is not a JSON object")
    if not message.get("ok"):
        err = message.get("errno", errno.EIO)
        if type(err) is not int or not 0 < err < 4096:
            raise ControlError(errno.EPROTO, f"{url}: reply has a bad errno {shown(str(err))}")
        raise ControlError(err, str(message.get("error")))
    result = message.get("result", {})
    if not isinstance(result, dict):
        raise ControlError(errno.EPROTO, f"{url}: result is not an object")
    return result


def call(url: str, command: str, args: dict[str, Any] | None = None,
         tls: ssl.SSLContext | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """Run one control command on the server at `url` and return its result."""
    with ControlConnection(url, tls, timeout) as connection:
        return connection.call(command, args)
