"""Taking over a unix socket path left behind by a crash, and nothing else (a leaf module: the
NBD server and the lock manager both listen on unix sockets)."""

from __future__ import annotations

import errno
import os
import socket
import stat


def remove_stale_socket(path: str) -> None:
    """Remove `path` if it is a socket nobody listens on (left behind by a crash).

    Anything else there is FileExistsError: a live socket is another server's (errno
    EADDRINUSE), and a regular file or a symlink (lstat: never followed, even to a stale
    socket) is not ours to delete (EEXIST).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, f"cannot listen on unix://{path}: it exists and is not "
                      "a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on unix://{path}: {e.strerror}") from None
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"cannot listen on unix://{path}: in use by a running "
                  "server")
