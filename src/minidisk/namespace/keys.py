"""Namespace keys, with rump_etfs's rules (NetBSD rumpfs.c) and one fix.

* A key must begin with ``/`` (EINVAL otherwise). Leading slashes collapse to one (``//k`` is
  ``/k``); the rest is compared verbatim, so ``/k/p`` and ``/k//p`` are different keys.
* The bare ``/`` names nothing and is EINVAL: its export name would be the empty string, which
  NBD reserves for the default export. A NUL byte is EINVAL too (it cannot cross the control
  channel or the NBD wire as part of a name), and keys longer than NBD's 4096-byte export-name
  limit are ENAMETOOLONG.
* Plain keys (reg, blk, chr, registered devices) match exactly. Directory keys (dir,
  dir_subdirs) match as a prefix, but, unlike NetBSD, only at a ``/`` boundary: the directory
  key ``/foo`` covers ``/foo/bar`` and never ``/foobar``.
"""

from __future__ import annotations

import enum
import errno

RUMP_ETFS_SIZE_ENDOFF = 2**64 - 1  # "the window runs to the end of the host file"
MAX_KEY_BYTES = 4096  # NBD's limit on export names


class EtfsType(enum.Enum):
    """rump_etfs types (RUMP_ETFS_REG … RUMP_ETFS_DIR_SUBDIRS), spelled as drivespecs spell them."""

    REG = "reg"
    BLK = "blk"
    CHR = "chr"
    DIR = "dir"
    DIR_SUBDIRS = "dir_subdirs"

    @property
    def is_dir(self) -> bool:
        return self in (EtfsType.DIR, EtfsType.DIR_SUBDIRS)

    @classmethod
    def parse(cls, value: str | EtfsType) -> EtfsType:
        if isinstance(value, EtfsType):
            return value
        try:
            return cls(value)
        except ValueError:
            raise OSError(errno.EINVAL, f"unknown etfs type {value!r}") from None


def canonical_key(key: str) -> str:
    """The key as the namespace stores it: exactly one leading slash, the rest untouched."""
    if not key.startswith("/"):
        raise OSError(errno.EINVAL, f"key {key!r} does not begin with '/'")
    canonical = "/" + key.lstrip("/")
    if canonical == "/":
        raise OSError(errno.EINVAL, "key '/' names nothing")
    if "\0" in canonical:
        raise OSError(errno.EINVAL, "key contains a NUL byte")
    if len(canonical[1:].encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
        raise OSError(errno.ENAMETOOLONG, f"key is longer than {MAX_KEY_BYTES} bytes")
    return canonical


def export_name(key: str) -> str:
    """A canonical key as an NBD export name (no leading slash)."""
    return key[1:]


def under_directory(dir_key: str, key: str) -> str | None:
    """The part of `key` below the directory key `dir_key`, or None when `key` is not under it.

    The ``/`` boundary is required: ``/foo`` is not a prefix directory of ``/foobar``.
    """
    prefix = dir_key + "/"
    if key.startswith(prefix):
        return key[len(prefix):]
    return None
