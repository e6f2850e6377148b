"""The directory: owners, their disks, per-disk passwords, grants, and the audit log.

minidisk's counterpart of z/VM's user directory (MDISK statements with their read, write and
multi passwords, LINK statements) and of an ESM's permits, in one SQLite file that lives next
to the daemon's state and is readable by its administrators only (created 0600: it holds
password hashes).

* Concurrent writers: WAL journal, a busy timeout, and every change in one `BEGIN IMMEDIATE`
  transaction, so two administrators (or an administrator and a daemon auditing) never lose
  each other's writes and never see half a change.
* Passwords: z/VM's `ALL` keyword (anyone may link in that class without one), unset (nobody
  but the owner and grantees may), or a salted scrypt hash — the plaintext is never stored.
  The keyword is its own marker, set by `allow_everyone`; a password that reads "ALL" is a
  password like any other (hashed, and needed).
* Audit: every link, unlink and refusal, append-only; triggers refuse UPDATE and DELETE, so
  not even a bug in this module can rewrite history.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from minidisk.link.modes import LinkMode, PasswordClass, allowed_by, parse_link_mode
from minidisk.link.names import DiskKey, has_control_characters

DEFAULT_PATH = "/var/lib/minidisk/directory.sqlite"
ENV_PATH = "MINIDISK_DIRECTORY"
# The stored marker of z/VM's ALL keyword: no hash looks like it, and no password becomes it.
EVERYONE = "keyword:ALL"

# scrypt cost: 16 MiB and ~50 ms per check, the interactive-login figure from the scrypt paper.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 1 << 14, 8, 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    name TEXT PRIMARY KEY,
    principal TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS disks (
    owner TEXT NOT NULL REFERENCES owners(name),
    disk TEXT NOT NULL,
    server TEXT NOT NULL,
    key TEXT NOT NULL,
    read_password TEXT,
    write_password TEXT,
    multi_password TEXT,
    PRIMARY KEY (owner, disk)
);
CREATE TABLE IF NOT EXISTS grants (
    principal TEXT NOT NULL,
    owner TEXT NOT NULL,
    disk TEXT NOT NULL,
    mode TEXT NOT NULL,
    PRIMARY KEY (principal, owner, disk),
    FOREIGN KEY (owner, disk) REFERENCES disks(owner, disk)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    disk TEXT NOT NULL,
    mode TEXT NOT NULL,
    outcome TEXT NOT NULL,
    why TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class DirectoryError(OSError):
    """A refused directory change or lookup; `errno` says which kind, `strerror` why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class Disk:
    owner: str
    disk: str
    server: str  # the control URL of the server that holds it
    key: str  # its namespace key there
    owner_principal: str
    passwords: dict[PasswordClass, str | None]  # None, EVERYONE or a scrypt hash

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.disk}"

    @property
    def export(self) -> str:
        return self.key.lstrip("/")


@dataclass(frozen=True)
class AuditEntry:
    at: float
    who: str
    action: str  # link, unlink, refuse
    disk: str
    mode: str
    outcome: str
    why: str


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R,
                            p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(digest) // 2)
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


def default_path() -> str:
    return os.environ.get(ENV_PATH) or DEFAULT_PATH


class Directory:
    def __init__(self, path: str | Path, check_same_thread: bool = True) -> None:
        """`check_same_thread=False` for a connection that is opened in one thread and then
        used in another one only (the link authority's worker thread)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 before SQLite sees it: its WAL and shm files copy these permissions.
        # Only created: closing a descriptor of a database file drops every POSIX lock this
        # process holds on it, also another connection's (which then lost its WAL to the
        # next process that closed the file: the link authority keeps two connections).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                  check_same_thread=check_same_thread)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        with self._write():
            # Not executescript(): it would COMMIT first and run outside our transaction.
            for statement in _SCHEMA.split(";\n"):
                if statement.strip():
                    self.db.execute(statement)

    def close(self) -> None:
        self.db.close()

    def data_version(self) -> int:
        """Changes whenever another connection (process or thread) committed a change: a
        cheap test of whether what was read before is still what the file holds."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time across processes; all or nothing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- owners and disks --

    def define_owner(self, owner: str, principal: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO owners VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                       "SET principal = excluded.principal", (owner, principal))

    def define_disk(self, key: DiskKey, server: str, namespace_key: str) -> None:
        for what, text in (("server", server), ("key", namespace_key)):
            if has_control_characters(text):
                raise DirectoryError(errno.EINVAL, f"{what} {text!r} of {key.name} contains "
                                     "a control character")
        with self._write() as db:
            if db.execute("SELECT 1 FROM owners WHERE name = ?", (key.owner,)).fetchone() is None:
                raise DirectoryError(errno.ENOENT, f"no owner {key.owner!r}: define it first "
                                        f"(minidisk directory define {key.owner} --identity …)")
            db.execute("INSERT INTO disks (owner, disk, server, key) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(owner, disk) DO UPDATE SET server = excluded.server, "
                       "key = excluded.key", (key.owner, key.disk, server, namespace_key))

    def undefine_disk(self, key: DiskKey) -> None:
        with self._write() as db:
            db.execute("DELETE FROM grants WHERE owner = ? AND disk = ?", (key.owner, key.disk))
            if db.execute("DELETE FROM disks WHERE owner = ? AND disk = ?",
                          (key.owner, key.disk)).rowcount == 0:
                raise DirectoryError(errno.ENOENT, f"no disk {key.name}")

    def undefine_owner(self, owner: str) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM disks WHERE owner = ?", (owner,)).fetchone():
                raise DirectoryError(errno.ENOTEMPTY,
                                     f"owner {owner!r} still has disks; undefine them first")
            if db.execute("DELETE FROM owners WHERE name = ?", (owner,)).rowcount == 0:
                raise DirectoryError(errno.ENOENT, f"no owner {owner!r}")

    def set_password(self, key: DiskKey, kind: PasswordClass, password: str | None) -> None:
        """`password` is the plaintext (any text: "ALL" too is only a password), or None to
        allow nobody without a grant.

        As MDISK requires, a write password needs a read password and a multi password
        needs both."""
        self._set_password(key, kind, None if password is None else hash_password(password))

    def allow_everyone(self, key: DiskKey, kind: PasswordClass) -> None:
        """z/VM's ALL: anyone may link in this class without a password."""
        self._set_password(key, kind, EVERYONE)

    def _set_password(self, key: DiskKey, kind: PasswordClass, stored: str | None) -> None:
        column = f"{kind.value}_password"
        with self._write() as db:
            row = db.execute("SELECT read_password, write_password FROM disks "
                             "WHERE owner = ? AND disk = ?", (key.owner, key.disk)).fetchone()
            if row is None:
                raise DirectoryError(errno.ENOENT, f"no disk {key.name}")
            if stored is not None and kind is not PasswordClass.READ and row[0] is None:
                raise DirectoryError(errno.EINVAL, f"set a read password on {key.name} first "
                                         f"(a {kind.value} password needs one)")
            if stored is not None and kind is PasswordClass.MULTI and row[1] is None:
                raise DirectoryError(errno.EINVAL, f"set a write password on {key.name} first "
                                         "(a multi password needs one)")
            db.execute(f"UPDATE disks SET {column} = ? WHERE owner = ? AND disk = ?",
                       (stored, key.owner, key.disk))

    def disk(self, key: DiskKey) -> Disk | None:
        row = self.db.execute(
            "SELECT d.owner, d.disk, d.server, d.key, o.principal, d.read_password, "
            "d.write_password, d.multi_password FROM disks d JOIN owners o ON o.name = d.owner "
            "WHERE d.owner = ? AND d.disk = ?", (key.owner, key.disk)).fetchone()
        return None if row is None else _disk(row)

    def disks(self) -> list[Disk]:
        rows = self.db.execute(
            "SELECT d.owner, d.disk, d.server, d.key, o.principal, d.read_password, "
            "d.write_password, d.multi_password FROM disks d JOIN owners o ON o.name = d.owner "
            "ORDER BY d.owner, d.disk").fetchall()
        return [_disk(row) for row in rows]

    def owners(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT name, principal FROM owners ORDER BY name"))

    def owner_exists(self, owner: str) -> bool:
        return self.db.execute("SELECT 1 FROM owners WHERE name = ?", (owner,)).fetchone() \
            is not None

    # -- grants --

    def grant(self, principal: str, key: DiskKey, mode: LinkMode) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM disks WHERE owner = ? AND disk = ?",
                          (key.owner, key.disk)).fetchone() is None:
                raise DirectoryError(errno.ENOENT, f"no disk {key.name}")
            db.execute("INSERT INTO grants VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
                       "SET mode = excluded.mode", (principal, key.owner, key.disk, mode.name))

    def revoke(self, principal: str, key: DiskKey) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM grants WHERE principal = ? AND owner = ? AND disk = ?",
                          (principal, key.owner, key.disk)).rowcount == 0:
                raise DirectoryError(errno.ENOENT, f"{principal} has no grant on {key.name}")

    def granted_mode(self, principal: str, key: DiskKey) -> LinkMode | None:
        row = self.db.execute("SELECT mode FROM grants WHERE principal = ? AND owner = ? "
                              "AND disk = ?", (principal, key.owner, key.disk)).fetchone()
        return None if row is None else parse_link_mode(row[0])

    def grants(self) -> list[tuple[str, str, str]]:
        """(principal, owner.disk, mode) rows."""
        return [(p, f"{o}.{d}", m) for p, o, d, m in self.db.execute(
            "SELECT principal, owner, disk, mode FROM grants ORDER BY owner, disk, principal")]

    # -- authorization --

    def authorize(self, principal: str, disk: Disk, mode: LinkMode,
                  password: str | None) -> str:
        """Why `principal` may link `disk` in `mode` (a short reason for the audit log);
        DirectoryError(EACCES) saying what is missing otherwise. Checked before locking."""
        if principal == disk.owner_principal:
            return "owner"
        key = DiskKey(disk.owner, disk.disk)
        granted = self.granted_mode(principal, key)
        if granted is not None and allowed_by(granted, mode):
            return f"grant {granted.name}"
        stored = disk.passwords[mode.password]
        if stored == EVERYONE:
            return f"{mode.password.value} password ALL"
        if stored is not None and password is not None and check_password(stored, password):
            return f"{mode.password.value} password"
        if stored is not None:
            why = "wrong" if password is not None else "no"
            raise DirectoryError(errno.EACCES,
                                 f"{why} {mode.password.value} password for {disk.name}")
        if granted is not None:
            raise DirectoryError(errno.EACCES, f"the grant of {disk.name} to {principal} "
                                 f"allows up to {granted.name}, not {mode.name}")
        raise DirectoryError(errno.EACCES, f"{principal} has no grant on {disk.name} and it "
                             f"has no {mode.password.value} password: ask its administrator")

    # -- audit --

    def audit(self, who: str, action: str, disk: str, mode: str, outcome: str,
              why: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO audit (at, who, action, disk, mode, outcome, why) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (time.time(), who, action, disk, mode, outcome, why))

    def audit_log(self, since: int = 0) -> list[AuditEntry]:
        return [AuditEntry(*row) for row in self.db.execute(
            "SELECT at, who, action, disk, mode, outcome, why FROM audit WHERE id > ? "
            "ORDER BY id", (since,))]


def _disk(row: tuple[str, ...]) -> Disk:
    owner, disk, server, key, principal, read_pw, write_pw, multi_pw = row
    return Disk(owner, disk, server, key, principal,
                {PasswordClass.READ: read_pw, PasswordClass.WRITE: write_pw,
                 PasswordClass.MULTI: multi_pw})
