"""Keys, principals and the directory store: validation, passwords, grants, the audit log."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from tests.harness import MINIDISK

from minidisk.link.directory import Directory, DirectoryError
from minidisk.link.modes import LINK_MODES, PasswordClass, parse_link_mode
from minidisk.link.names import DiskKey, parse_key, parse_principal


@pytest.mark.parametrize("text, key", [
    ("alice.0191", DiskKey("alice", "0191")),
    ("ALICE.191", DiskKey("alice", "0191")),
    ("alice.191.2", DiskKey("alice", "0191", 2)),
    ("bob-2.FFFF", DiskKey("bob-2", "ffff")),
])
def test_keys_are_normalised(text: str, key: DiskKey) -> None:
    assert parse_key(text) == key


@pytest.mark.parametrize("text", [
    "..", ".", "a/b", "a", "alice", "alice.", ".0191", "alice..0191", "alice.0191.",
    "alice.12345", "alice.01g1", "alice.0191.0", "alice.0191.1000", "-alice.0191",
    "_x.0191", "alice.0191.1.2", "al ice.0191", "alice.0191\n", "a" * 300, "a" * 33 + ".1",
])
def test_bad_keys_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_key(text)


def test_principals() -> None:
    assert parse_principal("root") == "uid:0"
    assert parse_principal("65534") == "uid:65534"
    assert parse_principal("uid:7") == "uid:7"
    assert parse_principal("CN=bob,O=example") == "subject:CN=bob,O=example"
    with pytest.raises(ValueError):
        parse_principal("no-such-user-here")


@pytest.fixture
def directory(tmp_path: Path) -> Directory:
    d = Directory(tmp_path / "dir.sqlite")
    d.define_owner("alice", "uid:1000")
    d.define_disk(parse_key("alice.0191"), "unix:///x.sock", "/alice/0191")
    return d


def _authorize(d: Directory, principal: str, mode: str, password: str | None = None) -> str:
    disk = d.disk(parse_key("alice.0191"))
    assert disk is not None
    return d.authorize(principal, disk, parse_link_mode(mode), password)


def test_passwords_are_stored_as_salted_hashes(directory: Directory, tmp_path: Path) -> None:
    key = parse_key("alice.0191")
    directory.set_password(key, PasswordClass.READ, "open-sesame-read")
    directory.set_password(key, PasswordClass.WRITE, "open-sesame-write")
    directory.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the db, its WAL and shm
    assert b"open-sesame" not in raw
    assert (tmp_path / "dir.sqlite").stat().st_mode & 0o777 == 0o600
    d = Directory(tmp_path / "dir.sqlite")
    disk = d.disk(key)
    assert disk is not None
    read_hash = disk.passwords[PasswordClass.READ]
    assert read_hash is not None and read_hash.startswith("scrypt$")
    d.set_password(key, PasswordClass.READ, "open-sesame-read")  # same password, new salt
    again = d.disk(key)
    assert again is not None and again.passwords[PasswordClass.READ] != read_hash


def test_password_classes(directory: Directory) -> None:
    key = parse_key("alice.0191")
    with pytest.raises(DirectoryError, match="no grant"):
        _authorize(directory, "uid:5", "R")
    with pytest.raises(DirectoryError, match="set a read password"):
        directory.set_password(key, PasswordClass.WRITE, "w")
    directory.set_password(key, PasswordClass.READ, "r-secret")
    assert _authorize(directory, "uid:5", "RR", "r-secret") == "read password"
    with pytest.raises(DirectoryError, match="wrong read password"):
        _authorize(directory, "uid:5", "R", "guess")
    with pytest.raises(DirectoryError, match="no read password"):
        _authorize(directory, "uid:5", "R")
    with pytest.raises(DirectoryError):  # the read password does not open write modes
        _authorize(directory, "uid:5", "W", "r-secret")
    directory.allow_everyone(key, PasswordClass.WRITE)
    assert _authorize(directory, "uid:5", "WR") == "write password ALL"
    directory.set_password(key, PasswordClass.WRITE, None)
    with pytest.raises(DirectoryError, match="set a write password"):
        directory.set_password(key, PasswordClass.MULTI, "m")
    assert _authorize(directory, "uid:1000", "MW") == "owner"


def test_grants_cover_their_class_and_below(directory: Directory) -> None:
    key = parse_key("alice.0191")
    directory.grant("uid:5", key, parse_link_mode("W"))
    for mode in ("R", "RR", "SR", "ER", "W", "WR", "SW", "EW"):
        assert _authorize(directory, "uid:5", mode) == "grant W"
    for mode in ("M", "MR", "MW", "SM"):
        with pytest.raises(DirectoryError, match="allows up to W"):
            _authorize(directory, "uid:5", mode)
    directory.revoke("uid:5", key)
    with pytest.raises(DirectoryError):
        _authorize(directory, "uid:5", "R")
    assert set(LINK_MODES) == {"R", "RR", "SR", "ER", "W", "WR", "SW", "EW", "M", "MR",
                               "MW", "SM"}


def test_audit_log_is_append_only(directory: Directory) -> None:
    directory.audit("uid:5", "link", "alice.0191", "R", "refused", "no grant")
    assert [e.why for e in directory.audit_log()] == ["no grant"]
    for statement in ("UPDATE audit SET why = 'nothing'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            directory.db.execute(statement)
    assert [e.why for e in directory.audit_log()] == ["no grant"]


def _grant_many(path: str, first: int) -> None:
    d = Directory(path)
    for uid in range(first, first + 40):
        d.grant(f"uid:{uid}", parse_key("alice.0191"), parse_link_mode("R"))
        d.audit(f"uid:{uid}", "link", "alice.0191", "R", "linked", "test")
    d.close()


def test_concurrent_writers_lose_nothing(directory: Directory, tmp_path: Path) -> None:
    path = str(tmp_path / "dir.sqlite")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_grant_many, args=(path, first)) for first in (0, 100, 200)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert len(directory.grants()) == 120
    assert len(directory.audit_log()) == 120


def test_a_password_spelled_all_is_a_password(directory: Directory, tmp_path: Path) -> None:
    """`ALL` (anyone, no password) is its own marker; a password that reads "ALL" is hashed
    and checked like any other (issue 10, item 6)."""
    key = parse_key("alice.0191")
    directory.set_password(key, PasswordClass.READ, "ALL")
    with pytest.raises(DirectoryError, match="no read password"):
        _authorize(directory, "uid:5", "R")
    with pytest.raises(DirectoryError, match="wrong read password"):
        _authorize(directory, "uid:5", "R", "all")
    assert _authorize(directory, "uid:5", "R", "ALL") == "read password"
    disk = directory.disk(key)
    assert disk is not None and str(disk.passwords[PasswordClass.READ]).startswith("scrypt$")
    directory.allow_everyone(key, PasswordClass.READ)
    assert _authorize(directory, "uid:5", "R") == "read password ALL"


def test_the_cli_tells_the_keyword_from_a_password(tmp_path: Path) -> None:
    path = tmp_path / "dir.sqlite"
    env = {**os.environ, "MINIDISK_DIRECTORY": str(path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MINIDISK, "directory", *args], capture_output=True, text=True,
                              env=env, timeout=60)

    assert cli("define", "alice", "--identity", "uid:1000").returncode == 0
    assert cli("define", "alice.0191", "--server", "unix:///x", "--key", "/a").returncode == 0
    secret = tmp_path / "pw"
    secret.write_text("ALL\n")
    assert cli("passwd", "alice.0191", "read", "--password-file", str(secret)).returncode == 0
    assert "read=set " in cli("ls").stdout
    assert cli("passwd", "alice.0191", "read", "--all").returncode == 0
    assert "read=ALL " in cli("ls").stdout


FORGED = "alice.0191\n2026-01-01T00:00:00 uid:0 link alice.0191 W linked: owner"


def test_audit_lines_cannot_be_forged(directory: Directory, tmp_path: Path) -> None:
    """Text from a peer (a disk name, a reason) is printed escaped, one row one line."""
    directory.audit("uid:5", "link", FORGED, "W\r", "refused", "bad\x1b[2Jkey\u2028x")
    directory.close()
    done = subprocess.run([MINIDISK, "directory", "ls", "--audit"], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "MINIDISK_DIRECTORY": str(tmp_path / "dir.sqlite")})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, lines
    assert "alice.0191\\n2026-01-01T00:00:00 uid:0" in lines[0]
    assert "W\\r" in lines[0] and "bad\\x1b[2Jkey\\u2028x" in lines[0]


@pytest.mark.parametrize("who", ["subject:CN=a\nb", "CN=x\x00", "subject:CN=\u2028"])
def test_principals_with_control_characters_are_refused(who: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        parse_principal(who)
