"""Request counters and latency histograms, per connection and per export (as nbdkit's stats
filter reports them): requests, bytes and errors by errno for each command, and for each
command a histogram of service times in power-of-two buckets.

The connection updates its own `RequestStats` on the hot path with a few list increments
and no method call (connection.py `_execute`); a closed connection's figures are added into
its export's (`ExportStats`), so that an export's totals are its closed connections' plus
its live ones', read at `snapshot` time. Nothing here does I/O: the `stats` control command
(daemon) and `minidisk stats` present it.

A command's histogram is a minidisk.histogram one (log2 buckets of ~1 µs) of service
times, from the request's parse to its reply being queued: a request the device answers at
once shows the server's own cost. Only requests whose cookie is a multiple of
LATENCY_SAMPLE are timed (one in 16 for clients that count their cookies up, as libnbd, qemu
and nbdkit's clients do; the kernel's are tags, so its sample leans to the lower tags): two
clock reads cost ~0.4 µs on these VMs, a 4 KiB request's whole server time is ~8 µs, and
the issue allows 3 % for all the figures together. Counts, bytes and errors are of every
request.
"""

from __future__ import annotations

from typing import Any

from minidisk.histogram import BUCKETS, as_json
from minidisk.nbd import protocol as p

COMMANDS = 8  # READ .. BLOCK_STATUS: the commands a request can carry to the device
LATENCY_SAMPLE = 16  # one request in this many is timed
LATENCY_SAMPLE_MASK = LATENCY_SAMPLE - 1


class RequestStats:
    """One connection's figures (or an export's sum of them). The lists are indexed by the
    command's number (protocol.CMD_*); `errors` maps (command, NBD errno) to a count."""

    __slots__ = ("requests", "bytes", "errors", "latency", "latency_ns")

    def __init__(self) -> None:
        self.requests = [0] * COMMANDS
        self.bytes = [0] * COMMANDS
        self.errors: dict[tuple[int, int], int] = {}
        self.latency = [[0] * BUCKETS for _ in range(COMMANDS)]
        self.latency_ns = [0] * COMMANDS  # the timed requests' total time (a histogram's sum)

    def failed(self, cmd: int, error: int) -> None:
        """A request the device answered with `error` (counted as served by the caller)."""
        key = (cmd, error)
        self.errors[key] = self.errors.get(key, 0) + 1

    def refused(self, cmd: int, error: int) -> None:
        """A request answered with `error` before it reached the device (checks, shutdown)."""
        if 0 <= cmd < COMMANDS:
            self.requests[cmd] += 1
        key = (cmd if 0 <= cmd < COMMANDS else -1, error)
        self.errors[key] = self.errors.get(key, 0) + 1

    def add(self, other: RequestStats) -> None:
        for cmd in range(COMMANDS):
            self.requests[cmd] += other.requests[cmd]
            self.bytes[cmd] += other.bytes[cmd]
            self.latency_ns[cmd] += other.latency_ns[cmd]
            mine, theirs = self.latency[cmd], other.latency[cmd]
            for bucket in range(BUCKETS):
                mine[bucket] += theirs[bucket]
        for key, count in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + count

    def copy(self) -> RequestStats:
        copied = RequestStats()
        copied.add(self)
        return copied

    def to_json(self) -> dict[str, Any]:
        """Only the commands that were sent: {name: {requests, bytes, errors: {errno name:
        count}, latency_us: {bucket upper bound: count of the timed sample}}}."""
        out: dict[str, Any] = {}
        for cmd in range(COMMANDS):
            errors = {ERRNO_NAMES.get(err, str(err)): count
                      for (c, err), count in sorted(self.errors.items()) if c == cmd}
            if not self.requests[cmd] and not errors:
                continue
            out[p.CMD_NAMES.get(cmd, str(cmd))] = {
                "requests": self.requests[cmd], "bytes": self.bytes[cmd], "errors": errors,
                "latency_us": as_json(self.latency[cmd]),
                "latency_sum_us": round(self.latency_ns[cmd] / 1000, 3)}
        other = {ERRNO_NAMES.get(err, str(err)): count
                 for (c, err), count in sorted(self.errors.items()) if c == -1}
        if other:
            out["other"] = {"requests": sum(other.values()), "bytes": 0, "errors": other,
                            "latency_us": {}, "latency_sum_us": 0}
        return out


ERRNO_NAMES = {p.NBD_EPERM: "EPERM", p.NBD_EIO: "EIO", p.NBD_ENOMEM: "ENOMEM",
               p.NBD_EINVAL: "EINVAL", p.NBD_ENOSPC: "ENOSPC", p.NBD_EOVERFLOW: "EOVERFLOW",
               p.NBD_ENOTSUP: "ENOTSUP", p.NBD_ESHUTDOWN: "ESHUTDOWN"}


class ExportStats:
    """The figures of every export, kept as long as the server runs (the export may come and
    go with etfs): what closed connections did, by export name."""

    def __init__(self) -> None:
        self.closed: dict[str, RequestStats] = {}
        self.connections: dict[str, int] = {}  # name → connections that ever opened it

    def opened(self, name: str) -> None:
        self.connections[name] = self.connections.get(name, 0) + 1

    def closed_connection(self, name: str, stats: RequestStats) -> None:
        total = self.closed.get(name)
        if total is None:
            self.closed[name] = stats.copy()
        else:
            total.add(stats)

    def snapshot(self, live: list[tuple[str, RequestStats]]) -> dict[str, dict[str, Any]]:
        """{export: {connections (ever), open (now), commands}}: the closed connections'
        figures plus `live` (each open connection's export name and figures)."""
        totals = {name: stats.copy() for name, stats in self.closed.items()}
        open_now: dict[str, int] = {}
        for name, stats in live:
            totals.setdefault(name, RequestStats()).add(stats)
            open_now[name] = open_now.get(name, 0) + 1
        return {name: {"connections": self.connections.get(name, 0),
                       "open": open_now.get(name, 0),
                       "commands": totals[name].to_json()} for name in sorted(totals)}
