"""The control channel's server side: a table of named async handlers for JSON commands.

The wire (a private NBD option, OPT_MINIDISK_CONTROL, one JSON request and one
REP_MINIDISK_RESULT reply) is described with its client, minidisk/control_client.py.

Who may send control commands: the NBD server admits administrators (same uid or root on a
unix socket, a verified TLS client certificate on TCP) and, when the daemon runs the link
layer, any authenticated peer (any uid on a unix socket). `Control.admin` then tells the two
apart: commands added with `add_for_anyone` (link, unlink, resolve, links: they act only on
the caller's own links) run for every admitted peer, all others for administrators only.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from minidisk.control_client import shown
from minidisk.nbd import protocol as p
from minidisk.nbd.exports import Identity

log = logging.getLogger(__name__)

# A request is one option; larger option data is refused before it is read.
MAX_REQUEST = p.MAX_OPTION_DATA

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# For commands that act on behalf of the caller (link, unlink): the caller's proven identity.
IdentityHandler = Callable[[dict[str, Any], Identity], Awaitable[dict[str, Any]]]


class Control:
    """Server side: a table of named async handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, IdentityHandler] = {}
        self.for_anyone: set[str] = set()
        # Who is an administrator; None: everyone the server admits (no link layer).
        self.admin: Callable[[Identity], bool] | None = None

    def add(self, name: str, handler: Handler) -> None:
        async def ignoring_identity(args: dict[str, Any], identity: Identity) -> dict[str, Any]:
            return await handler(args)

        self.add_with_identity(name, ignoring_identity)

    def add_with_identity(self, name: str, handler: IdentityHandler) -> None:
        if name in self.handlers:
            raise ValueError(f"control command {name!r} registered twice")
        self.handlers[name] = handler

    def add_for_anyone(self, name: str, handler: IdentityHandler) -> None:
        """A command every admitted peer may run, not only administrators."""
        self.add_with_identity(name, handler)
        self.for_anyone.add(name)

    def update(self, handlers: dict[str, Handler]) -> None:
        for name, handler in handlers.items():
            self.add(name, handler)

    async def __call__(self, identity: Identity, request: bytes) -> bytes:
        """The reply to one request: never raises, so that every body gets an answer and
        the connection goes back to reading options (or hangs up) instead of waiting."""
        try:
            command, args = parse_request(request)
        except ValueError as e:
            return _reply_error(errno.EINVAL, f"malformed control request: {e}")
        handler = self.handlers.get(command)
        if handler is None:
            return _reply_error(errno.ENOSYS, f"unknown control command {shown(command)}")
        if command not in self.for_anyone and self.admin is not None and not self.admin(identity):
            log.warning("control %s refused to %s: not an administrator", command, identity)
            return _reply_error(errno.EPERM, f"{command!r} is for administrators only")
        try:
            result = await handler(args, identity)
        except OSError as e:
            return _reply_error(e.errno or errno.EIO, e.strerror or str(e))
        except (ValueError, KeyError, TypeError) as e:
            return _reply_error(errno.EINVAL, str(e))
        except Exception as e:
            log.exception("control command %s failed", command)
            return _reply_error(errno.EIO, f"{type(e).__name__}: {e}")
        log.info("control %s by %s", command, identity)
        try:
            return json.dumps({"ok": True, "result": result}).encode()
        except (TypeError, ValueError, RecursionError) as e:
            log.error("control command %s: result not representable in JSON: %s", command, e)
            return _reply_error(errno.EIO, f"{command}: result not representable in JSON")


def parse_request(request: bytes) -> tuple[str, dict[str, Any]]:
    """A control body's command name and arguments; ValueError names what is wrong."""
    if len(request) > MAX_REQUEST:  # the option reader refuses these before reading them
        raise ValueError(f"{len(request)} bytes, over {MAX_REQUEST}")
    try:
        text = request.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    try:
        message = json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer over Python's digit limit
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(message, dict):
        raise ValueError("the request must be a JSON object")
    command = message.get("command")
    if not isinstance(command, str):
        raise ValueError('"command" must be a string')
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ValueError('"args" must be an object')
    return command, args


def _reply_error(err: int, message: str) -> bytes:
    return json.dumps({"ok": False, "errno": err, "error": message}).encode()
