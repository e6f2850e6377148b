"""The link keeper: the process whose life is the life of one link.

`minidisk link` starts it (`python -m minidisk.link.keeper`) in a session of its own, so it
outlives the command and its terminal. The keeper opens a control connection to the server
that holds the disk, sends `link` (the password, if any, arrives on stdin, never in argv),
writes the server's answer as one JSON line on stdout, closes stdout, and then holds the
connection open, renewing the link's lease every third of it (the answer says how long it
is). The server binds the link — its lock, and the export policy's permission to open the
disk — to that connection and to the lease:

* `minidisk unlink` sends SIGTERM: the keeper sends `unlink` on the connection (so the audit
  log says "unlink"), closes it and exits 0;
* kill -9, a crash or a lost network close the connection without a word: the server ends
  the link all the same ("the holder's connection closed"), releases the lock and hangs up
  this principal's data connections to the disk;
* a keeper that cannot renew in time (its host hung, suspended, cut off) loses the link: the
  server ends it when the lease runs out, as if the connection had closed; when such a
  keeper runs again, its renewal is refused, and it says so on stderr and exits 4;
* if the server goes away first, the keeper sees EOF and exits 3.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from types import FrameType

from minidisk.control_client import ControlConnection, ControlError
from minidisk.nbd.tls import client_context

EXIT_REFUSED = 1
EXIT_SERVER_GONE = 3
EXIT_LINK_LOST = 4


class _Stop(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minidisk-link-keeper")
    parser.add_argument("--server", required=True)
    parser.add_argument("--disk", required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--password-on-stdin", action="store_true")
    parser.add_argument("--tls-certificates")
    parser.add_argument("--on-behalf-of")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is not for us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args: dict[str, str] = {"disk": options.disk, "mode": options.mode}
    if options.password_on_stdin:
        args["password"] = sys.stdin.readline().rstrip("\n")
    if options.on_behalf_of:
        args["on_behalf_of"] = options.on_behalf_of
    tls = client_context(options.tls_certificates) if options.tls_certificates else None
    try:
        connection = ControlConnection(options.server, tls, timeout=60.0)
        result = connection.call("link", args)
    except OSError as e:  # a ControlError too
        _report({"ok": False, "errno": e.errno or errno.EIO, "error": str(e)})
        return EXIT_REFUSED
    except _Stop:
        return EXIT_REFUSED
    _report({"ok": True, "pid": os.getpid(), **result})
    lease = float(result.get("lease") or 0)
    try:
        # The server never speaks first: a timeout is the time to renew, EOF its end.
        connection.sock.settimeout(lease / 3 if lease > 0 else None)
        while True:
            try:
                if not connection.sock.recv(4096):
                    return EXIT_SERVER_GONE
            except TimeoutError:
                try:
                    connection.call("renew")
                except ControlError as e:
                    if e.errno == errno.ECONNRESET:
                        return EXIT_SERVER_GONE
                    sys.stderr.write(f"minidisk link keeper: the link of {options.disk} is "
                                     f"gone: {e}\n")
                    return EXIT_LINK_LOST
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            connection.sock.settimeout(10.0)
            connection.call("unlink")
        except OSError:
            pass  # closing the connection ends the link anyway
        connection.close()
        return 0
    except OSError:
        return EXIT_SERVER_GONE


def _report(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()
    # Nothing more goes to the caller: it stops reading and may exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
