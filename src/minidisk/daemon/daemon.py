"""The minidisk daemon: devices, the NBD server, the control channel, one event loop.

`run_daemon` is the whole life of a server process: build the devices the configuration
names, listen, report readiness, serve until SIGINT/SIGTERM or a `halt` control command,
then shut down in order (finish in-flight requests, flush and close every device, remove
the unix socket).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any

from minidisk.daemon.control import Control
from minidisk.daemon.lifecycle import Readiness
from minidisk.device.api import BlockDevice
from minidisk.device.file import FileDevice
from minidisk.device.memory import MemoryDevice
from minidisk.nbd.exports import DictExports
from minidisk.nbd.listen import parse_url, socket_activation
from minidisk.nbd.negotiation import TLSMode
from minidisk.nbd.server import NBDServer, new_event_loop
from minidisk.nbd.tls import server_context

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d+)([kmgtp]?)(i?b?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_human_size(text: str) -> int:
    """128M, 1G, 4096, 1GiB: binary units, case-insensitive."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r} (expected e.g. 128M or 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def normalize_key(key: str) -> str:
    """Namespace keys begin with '/'; on the command line the slash may be left out."""
    if not key:
        raise ValueError("empty key")
    return "/" + key.lstrip("/")


@dataclass
class DaemonConfig:
    urls: list[str]
    memory: list[tuple[str, int]] = field(default_factory=list)
    files: list[tuple[str, str, int, int | None]] = field(default_factory=list)
    read_only: bool = False
    tls_mode: TLSMode = TLSMode.OFF
    tls_certificates: str | None = None
    tls_verify_peer: bool = False

    @classmethod
    def from_options(cls, urls: list[str], memory: tuple[str, ...] = (),
                     files: tuple[str, ...] = (), read_only: bool = False, tls: str = "off",
                     tls_certificates: str | None = None, tls_verify_peer: bool = False,
                     **_: Any) -> DaemonConfig:
        config = cls(urls, read_only=read_only, tls_mode=TLSMode(tls),
                     tls_certificates=tls_certificates, tls_verify_peer=tls_verify_peer)
        for spec in memory:
            key, sep, size = spec.partition("=")
            if not sep:
                raise ValueError(f"--memory {spec!r}: expected KEY=SIZE")
            config.memory.append((normalize_key(key), parse_human_size(size)))
        for spec in files:
            key, sep, rest = spec.partition("=")
            if not sep or not rest:
                raise ValueError(f"--file {spec!r}: expected KEY=PATH[:OFFSET:LENGTH]")
            parts = rest.rsplit(":", 2)
            if len(parts) == 3 and parts[1] and parts[2]:
                path, offset, length = parts[0], parse_human_size(parts[1]), \
                    parse_human_size(parts[2])
                config.files.append((normalize_key(key), path, offset, length))
            else:
                config.files.append((normalize_key(key), rest, 0, None))
        if config.tls_mode is not TLSMode.OFF and not tls_certificates:
            raise ValueError("--tls=on/require needs --tls-certificates DIR")
        for url in urls:
            parse_url(url)  # reject a bad URL before detaching
        if not urls and not _activated():
            raise ValueError("no URL to listen on (unix://PATH, tcp://IP:PORT/ or -)")
        return config

    def must_stay_in_foreground(self) -> bool:
        return self.urls == ["-"] or _activated()


def _activated() -> bool:
    return os.environ.get("LISTEN_PID") == str(os.getpid())


def build_devices(config: DaemonConfig) -> dict[str, BlockDevice]:
    devices: dict[str, BlockDevice] = {}

    def add(key: str, device: BlockDevice) -> None:
        if key in devices:
            raise ValueError(f"key {key} given twice")
        devices[key] = device

    for key, size in config.memory:
        add(key, MemoryDevice(size))
    for key, path, offset, length in config.files:
        add(key, FileDevice(path, offset, length, read_only=config.read_only))
    return devices


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.control = Control()
        self.devices = build_devices(config)
        tls = None
        if config.tls_certificates and config.tls_mode is not TLSMode.OFF:
            tls = server_context(config.tls_certificates, config.tls_verify_peer)
        self.server = NBDServer(DictExports(self.devices), read_only=config.read_only,
                                tls_mode=config.tls_mode, tls_context=tls,
                                control=self.control)
        self.control.add("halt", self._halt)
        self.control.add("exports", self._exports)

    async def _halt(self, args: dict[str, Any]) -> dict[str, Any]:
        await self.flush_all()
        self.stop.set()
        return {"pid": os.getpid()}

    async def _exports(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"exports": [{"name": key.lstrip("/"), "size": dev.size,
                             "description": dev.describe()}
                            for key, dev in self.devices.items()]}

    async def flush_all(self) -> None:
        for device in self.devices.values():
            if device.caps.flush and not device.caps.read_only:
                await device.flush()

    async def run(self, readiness: Readiness | None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        inherited = socket_activation()
        for sock in inherited:
            await self.server.listen_socket(sock, "socket")
        if not inherited:
            for url in self.config.urls:
                await self.server.listen(parse_url(url))
        if readiness is not None:
            readiness.ready()
        log.info("serving %s on %s", ", ".join(self.devices), " ".join(self.config.urls))
        waiters = [asyncio.ensure_future(self.stop.wait())]
        if self.server.stdio_done is not None:
            waiters.append(asyncio.ensure_future(self.server.stdio_done.wait()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        await self.server.shutdown()
        await self.flush_all()
        for device in self.devices.values():
            await device.close()
        return 0


def run_daemon(config: DaemonConfig, readiness: Readiness | None) -> int:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        daemon = Daemon(config)
        return loop.run_until_complete(daemon.run(readiness))
    except (OSError, ValueError) as e:
        message = str(e)
        if readiness is not None:
            readiness.failed(message)
        log.error("%s", message)
        if readiness is None:
            import sys
            print(f"minidisk serve: {message}", file=sys.stderr)
        return 1
    finally:
        loop.close()
