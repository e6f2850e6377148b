"""How much clients may make the lock manager hold: `minidisk dlm serve --max-...`.

A module of its own so that the command line reads the defaults without importing the
service (and asyncio)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """How much clients may make the service hold (`minidisk dlm serve --max-...`). Past a
    limit the request is refused with an errno that names it; nothing grows without bound.
    A resource with one lock costs the service about 1 KiB, each further lock on it 0.4 KiB."""

    clients: int = 1024             # connections at once (EUSERS, then hung up)
    prompt_clients: int = 16        # granted prompt-unlock at once (more: not granted)
    locks_per_client: int = 65536   # locks one connection has, granted or queued (ENOLCK)
    domains_per_client: int = 256   # domains one connection is a member of (EDQUOT)
    locks: int = 1 << 20            # locks of everyone together (ENOLCK)
    resources: int = 1 << 20        # resources, lock-free ones (value blocks) too (ENOSPC)
