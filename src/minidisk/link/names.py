"""The names the link layer deals in: disk keys (`owner.disk[.partition]`) and principals.

Keys arrive from users and, through the automounter, from any path anyone types under
/vmlink, so they are validated strictly and normalised to one spelling: owner in lower case,
the disk as z/VM writes a virtual device number (four lower-case hex digits, `191` →
`0191`), an optional partition number. Anything else is refused, never guessed at.

A principal is who a link belongs to, as the server proved it: `uid:N` for a unix-socket peer
(SO_PEERCRED) or `subject:CN=…` for a TLS client certificate's verified subject.
"""

from __future__ import annotations

import pwd
import re
import unicodedata
from dataclasses import dataclass

from minidisk.nbd.exports import Identity

KEY_MAX = 255  # a key is one path component under /vmlink (NAME_MAX)
_OWNER = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_DISK = re.compile(r"[0-9a-f]{1,4}")
_PARTITION = re.compile(r"[1-9][0-9]{0,2}")


@dataclass(frozen=True, order=True)
class DiskKey:
    owner: str
    disk: str
    partition: int | None = None

    @property
    def name(self) -> str:
        """`owner.disk`: the directory's name for the disk (without any partition)."""
        return f"{self.owner}.{self.disk}"

    def __str__(self) -> str:
        return self.name if self.partition is None else f"{self.name}.{self.partition}"

    def whole(self) -> DiskKey:
        return DiskKey(self.owner, self.disk)


def parse_key(text: str, *, partition: bool = True) -> DiskKey:
    """`ALICE.191` → alice.0191; ValueError (saying why) for anything that is not a key."""
    if len(text) > KEY_MAX:
        raise ValueError(f"key is {len(text)} characters long (at most {KEY_MAX})")
    parts = text.lower().split(".")
    if len(parts) not in (2, 3) or (len(parts) == 3 and not partition):
        want = "OWNER.DISK[.PARTITION]" if partition else "OWNER.DISK"
        raise ValueError(f"key {text!r} is not {want}")
    owner, disk = parts[0], parts[1]
    if not _OWNER.fullmatch(owner):
        raise ValueError(f"bad owner {owner!r} in {text!r} (letters, digits, _ and -, "
                         "at most 32, not starting with _ or -)")
    if not _DISK.fullmatch(disk):
        raise ValueError(f"bad disk {disk!r} in {text!r} (a virtual device number: "
                         "1 to 4 hex digits)")
    number = None
    if len(parts) == 3:
        if not _PARTITION.fullmatch(parts[2]):
            raise ValueError(f"bad partition {parts[2]!r} in {text!r} (1 to 999)")
        number = int(parts[2])
    return DiskKey(owner, disk.zfill(4), number)


def parse_owner(text: str) -> str:
    owner = text.lower()
    if not _OWNER.fullmatch(owner):
        raise ValueError(f"bad owner name {text!r}")
    return owner


def principal_of(identity: Identity) -> str | None:
    """Who the server proved the peer to be, or None for an anonymous peer (plain TCP)."""
    if identity.tls and identity.subject:
        return f"subject:{identity.subject}"
    if identity.uid is not None:
        return f"uid:{identity.uid}"
    return None


def has_control_characters(text: str) -> bool:
    """Newlines, escapes, format characters (bidi overrides), line separators: text with
    any of them is no name, and would forge or hide lines wherever it is printed."""
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def parse_principal(text: str) -> str:
    """What an administrator may type: `uid:N`, a number, a login name, `subject:DN` or a
    bare DN (`CN=bob,O=example`); stored as `uid:N` or `subject:DN`."""
    if has_control_characters(text):
        raise ValueError(f"principal {text!r} contains a control character")
    text = text.strip()
    if text.startswith("subject:"):
        if not text[len("subject:"):]:
            raise ValueError("empty certificate subject")
        return text
    if "=" in text:
        return f"subject:{text}"
    number = text.removeprefix("uid:")
    if number.isdigit():
        return f"uid:{int(number)}"
    try:
        return f"uid:{pwd.getpwnam(text).pw_uid}"
    except KeyError:
        raise ValueError(f"{text!r} is not a user here, a uid:N or a certificate "
                         "subject (CN=…)") from None
