"""What a server is told to do: command-line options and a TOML file, merged.

The TOML file can say everything the flags say, under the flags' long names::

    url = "unix:///run/minidisk/server.sock"      # or a list of URLs
    memory = ["/dev/dk=1G"]                       # --memory KEY=SIZE
    null = ["/sink=1T"]                           # --null KEY=SIZE: writes vanish, reads zero
    file = ["/img=/srv/disk.img:1M:64M"]          # --file KEY=PATH[:OFFSET:LENGTH]
    drive = ["key=/wd0,hostpath=wd0.img,size=1g"] # -d DRIVESPEC
    nbd = ["/remote=nbd://10.0.0.2/disk"]         # --nbd KEY=URI: another server's export
    table = ["striped=/etc/minidisk/striped.table"]  # --table NAME=FILE
    ram = "64m"                                   # -r TOTAL_RAM for block caches
    read_only = false
    read_write = false                            # --read-write: refuse a --file opened
                                                  #   read-only instead of serving it so
    tls = "require"                               # off | on | require
    tls_certificates = "/etc/minidisk/pki"
    tls_verify_peer = true
    admin_subject = ["CN=ops,O=example"]          # --admin-subject: TLS clients that may
                                                  #   run control commands (halt, etfs, dm)
    busy_poll_us = 0                              # --busy-poll-us: poll after requests
    max_connections = 1024                        # --max-connections: more are closed
    handshake_timeout = 10                        # --handshake-timeout: seconds to negotiate
    peer_timeout = 120                            # --peer-timeout: drop a peer that stalls
    payload_budget = "512M"                       # --payload-budget: request bytes in memory
    log_file = "/var/log/minidisk.log"
    pid_file = "/run/minidisk/server.pid"        # --pid-file: written once serving
    print_uri = true                              # --print-uri: the client URIs on stdout
    run = "nbdcopy $uri disk.img"                 # --run CMD: serve while CMD runs (captive)
    exit_with_parent = false                      # --exit-with-parent: stop when it exits
    metrics = "tcp://127.0.0.1:9100/"             # --metrics URL: Prometheus /metrics
    dlm = "unix:///run/minidisk/dlm.sock"         # --dlm URL: host the lock manager too
    directory = "/var/lib/minidisk/directory.sqlite"  # --directory FILE: govern linking
    link_dlm = "unix:///run/minidisk/dlm.sock"    # --link-dlm URL: lock manager for links
    link_lease = 60                               # seconds a link lives unrenewed

Lists from the file and from the command line are concatenated (file first); a scalar
given on the command line wins over the file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from minidisk.namespace import SizeError, parse_size
from minidisk.nbd.listen import parse_url
from minidisk.nbd.negotiation import TLSMode
from minidisk.nbd.transport import Transport

_LISTS = ("url", "memory", "null", "file", "drive", "nbd", "table", "admin_subject")
_SCALARS = {"ram": str, "read_only": bool, "read_write": bool, "tls": str, "tls_certificates": str,
            "tls_verify_peer": bool, "log_file": str, "dlm": str,
            "directory": str, "link_dlm": str, "link_lease": int, "busy_poll_us": int,
            "max_connections": int, "handshake_timeout": int, "peer_timeout": int,
            "payload_budget": str, "pid_file": str, "print_uri": bool, "run": str,
            "exit_with_parent": bool, "metrics": str}
# Integer settings: (smallest, largest, unit for the error message).
_BOUNDED = {"busy_poll_us": (0, 10_000, "microseconds"),
            "link_lease": (1, 86_400, "seconds"),
            "max_connections": (1, 1_000_000, "connections"),
            "handshake_timeout": (0, 86_400, "seconds (0: no deadline)"),
            "peer_timeout": (0, 86_400, "seconds (0: off)")}


def parse_human_size(text: str, option: str = "size") -> int:
    """A size in the one grammar every option takes (minidisk.namespace.sizes: b is 512,
    1G and 1GiB are 2**30, 1GB is 10**9), the error naming the option."""
    try:
        return parse_size(text)
    except SizeError as e:
        raise ValueError(f"{option}: {e}") from None


def normalize_key(key: str) -> str:
    """Namespace keys begin with '/'; on the command line the slash may be left out."""
    if not key.strip("/"):
        raise ValueError(f"bad key {key!r}")
    return "/" + key.lstrip("/")


def _split_pair(option: str, spec: str, what: str) -> tuple[str, str]:
    left, sep, right = spec.partition("=")
    if not sep or not left or not right:
        raise ValueError(f"--{option} {spec!r}: expected {what}")
    return left, right


@dataclass
class DaemonConfig:
    urls: list[str] = field(default_factory=list)
    memory: list[tuple[str, int]] = field(default_factory=list)
    null: list[tuple[str, int]] = field(default_factory=list)
    files: list[tuple[str, str, int, int | None]] = field(default_factory=list)
    drives: list[str] = field(default_factory=list)
    remotes: list[tuple[str, str]] = field(default_factory=list)
    tables: list[tuple[str, str]] = field(default_factory=list)
    ram: int | None = None
    read_only: bool = False
    read_write: bool = False  # a --file that opens only read-only is an error, not a warning
    tls_mode: TLSMode = TLSMode.OFF
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    admin_subjects: list[str] = field(default_factory=list)
    log_file: str | None = None
    pid_file: str | None = None  # written with the server's pid once it serves
    print_uri: bool = False  # print each export's client URI once serving (nbdkit's)
    run: str | None = None  # captive mode: serve while this shell command runs
    exit_with_parent: bool = False  # stop when the process that started us exits
    metrics: str | None = None  # tcp://IP:PORT/ of the Prometheus endpoint (metrics.py)
    busy_poll_us: int = 0  # 0: the NBD server never busy-polls (see minidisk.busypoll)
    max_connections: int = 1024  # open connections (any phase); more are closed at once
    handshake_timeout: int = 10  # seconds a client has to reach transmission (qemu: 10)
    peer_timeout: int = 120  # seconds before a vanished or stalled peer is dropped
    payload_budget: int = 512 << 20  # READ/WRITE payload bytes all clients may hold
    dlm: str | None = None
    directory: str | None = None  # the link directory (minidisk.link); None: no link layer
    link_dlm: str | None = None  # where links take their locks (default: --dlm, $MINIDISK_DLM)
    link_lease: int = 60  # seconds a link lives without its holder renewing it

    @classmethod
    def load(cls, options: dict[str, Any], config_file: str | None = None) -> DaemonConfig:
        """Build from CLI `options` (long names; lists as tuples) and an optional TOML file."""
        merged: dict[str, Any] = {name: [] for name in _LISTS}
        if config_file:
            merged.update(_read_toml(config_file))
        for name in _LISTS:
            merged[name] = list(merged.get(name, [])) + list(options.get(name) or ())
        for name in _SCALARS:
            value = options.get(name)
            if value is not None and value is not False:  # not `in`: 0 == False
                merged[name] = value
        return cls._from_merged(merged)

    @classmethod
    def _from_merged(cls, m: dict[str, Any]) -> DaemonConfig:
        config = cls(urls=[str(u) for u in m["url"]], drives=[str(d) for d in m["drive"]])
        for option in ("memory", "null"):
            for spec in m[option]:
                key, size = _split_pair(option, spec, "KEY=SIZE")
                getattr(config, option).append((normalize_key(key),
                                                 parse_human_size(size, f"--{option} {spec}")))
        for spec in m["file"]:
            key, rest = _split_pair("file", spec, "KEY=PATH[:OFFSET:LENGTH]")
            parts = rest.rsplit(":", 2)
            if len(parts) == 3 and parts[1] and parts[2]:
                where = f"--file {spec}"
                config.files.append((normalize_key(key), parts[0],
                                     parse_human_size(parts[1], where),
                                     parse_human_size(parts[2], where)))
            else:
                config.files.append((normalize_key(key), rest, 0, None))
        for spec in m["nbd"]:
            key, uri = _split_pair("nbd", spec, "KEY=NBD-URI")
            config.remotes.append((normalize_key(key), uri))
        for spec in m["table"]:
            name, path = _split_pair("table", spec, "NAME=FILE")
            config.tables.append((name, os.path.abspath(path)))
        if m.get("ram"):
            config.ram = parse_human_size(str(m["ram"]), "-r")
        config.read_only = bool(m.get("read_only", False))
        config.read_write = bool(m.get("read_write", False))
        if config.read_only and config.read_write:
            raise ValueError("--read-only and --read-write: give one")
        config.tls_mode = TLSMode(m.get("tls", "off"))
        config.tls_certificates = m.get("tls_certificates")
        config.tls_verify_peer = bool(m.get("tls_verify_peer", False))
        config.admin_subjects = [str(subject) for subject in m["admin_subject"]]
        config.log_file = m.get("log_file")
        config.pid_file = os.path.abspath(m["pid_file"]) if m.get("pid_file") else None
        config.print_uri = bool(m.get("print_uri", False))
        config.run = m.get("run") or None
        config.exit_with_parent = bool(m.get("exit_with_parent", False))
        config.metrics = m.get("metrics") or None
        if config.metrics is not None and parse_url(config.metrics).kind is not Transport.TCP:
            raise ValueError(f"--metrics {config.metrics}: give tcp://IP:PORT/ (Prometheus "
                             "scrapes over HTTP)")
        for name, (low, high, unit) in _BOUNDED.items():
            value = m.get(name, getattr(config, name))
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} = {value!r}: expected {low} to {high} {unit}")
            setattr(config, name, value)
        if m.get("payload_budget"):
            config.payload_budget = parse_human_size(str(m["payload_budget"]),
                                                     "--payload-budget")
            if config.payload_budget < 1 << 20:
                raise ValueError(f"payload_budget = {m['payload_budget']!r}: expected at "
                                 "least 1M")
        config.dlm = m.get("dlm")
        config.directory = os.path.abspath(m["directory"]) if m.get("directory") else None
        config.link_dlm = m.get("link_dlm")
        if config.tls_mode is not TLSMode.OFF and not config.tls_certificates:
            raise ValueError("--tls=on/require needs --tls-certificates DIR")
        for url in config.urls:
            parse_url(url)  # reject a bad URL before detaching
        if config.run is not None and "-" in config.urls:
            raise ValueError("--run and - (stdio): the command needs a socket to connect to; "
                             "give unix://PATH or tcp://IP:PORT/ (or no URL: a private "
                             "socket)")
        if not config.urls and not socket_activated() and not config.run:
            raise ValueError("no URL to listen on (unix://PATH, tcp://IP:PORT/ or -)")
        return config

    def must_stay_in_foreground(self) -> bool:
        """stdio, systemd's sockets, a captive command and a parent to exit with all need the
        process that was started (nbdkit's --run and --exit-with-parent imply -f too)."""
        return (self.urls == ["-"] or socket_activated() or self.run is not None
                or self.exit_with_parent)


def socket_activated() -> bool:
    return os.environ.get("LISTEN_PID") == str(os.getpid())


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: {e}") from None
    unknown = set(data) - set(_LISTS) - set(_SCALARS)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(sorted(unknown))}")
    for name in _LISTS:
        if name in data and isinstance(data[name], str):
            data[name] = [data[name]]
        if name in data and not isinstance(data[name], list):
            raise ValueError(f"--config {path}: {name} must be a string or a list")
    for name, kind in _SCALARS.items():
        if name in data and not isinstance(data[name], kind):
            raise ValueError(f"--config {path}: {name} must be a {kind.__name__}")
    return data
