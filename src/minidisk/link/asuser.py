"""Run one step of a link as the local user it is made for.

The automounter and the stock automount's program map run as root, but a link must be made
with the identity of the user who asked: the server authenticates control connections by
SO_PEERCRED, so the process that connects must *be* that user, or every user would link with
root's grants. Such a process starts as root (the interpreter and our modules may live where
the user cannot read them), imports what it needs, then takes the user's groups, gid and uid
for good (setgroups, setresgid, setresuid: real, effective and saved ids, so there is no way
back) and only then connects and reads files (TLS certificates are read as that user too).
What the standard library would import lazily later is imported here first, since the user
may not be able to read our interpreter's library:

    python -m minidisk.link.asuser UID GID keeper ARGS...     the link keeper (keeper.py)
    python -m minidisk.link.asuser UID GID resolve SERVER KEY [TLS_DIR]

`resolve` prints one JSON line: {"ok": true, "result": …} or {"ok": false, "errno", "error"}.
A subprocess rather than a fork of the caller: the automounter has threads, and a fork of a
threaded process may inherit a lock some other thread held.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401  (getaddrinfo encodes host names with it, lazily)
import errno
import json
import os
import pwd
import shutil  # noqa: F401  (argparse's help formatter imports it lazily)
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class LocalUser:
    uid: int
    gid: int

    @property
    def login(self) -> str | None:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return None

    def groups(self) -> list[int]:
        """What login would give: the groups of the user's passwd name, or gid alone."""
        login = self.login
        return os.getgrouplist(login, self.gid) if login is not None else [self.gid]

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "minidisk.link.asuser", str(self.uid), str(self.gid)]

    def __str__(self) -> str:
        return f"uid:{self.uid}"


def become(user: LocalUser) -> None:
    """Be `user` from here on, for good; raises PermissionError when we may not."""
    if (os.geteuid(), os.getegid()) == (user.uid, user.gid):
        return  # already (a user running the map by hand, or root for root)
    os.setgroups(user.groups())
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] not in ("keeper", "resolve"):
        sys.stderr.write("usage: asuser UID GID keeper ARGS... | resolve SERVER KEY [TLS]\n")
        return 2
    user = LocalUser(int(argv[0]), int(argv[1]))
    if argv[2] == "keeper":
        from minidisk.link import keeper

        become(user)
        return keeper.main(argv[3:])
    from minidisk.control_client import call
    from minidisk.nbd.tls import client_context

    server, key, *tls_dir = argv[3:]
    become(user)
    try:
        tls = client_context(tls_dir[0]) if tls_dir else None
        answer = {"ok": True, "result": call(server, "resolve", {"key": key}, tls=tls,
                                             timeout=60.0)}
    except OSError as e:  # a ControlError too
        answer = {"ok": False, "errno": e.errno or errno.EIO, "error": str(e)}
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
