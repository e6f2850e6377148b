"""The minidisk daemon: namespace, device-mapper, NBD server and control, on one loop.

`run_daemon` is the whole life of a server process: build the namespace the configuration
describes (memory disks, host files, drivespecs, remote exports, dm tables), listen,
report readiness, serve until SIGINT/SIGTERM or a `halt` control command, then shut down
in order: finish in-flight requests, write back caches and fsync host files, remove mapped
devices, close every device, remove the unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from minidisk.daemon import captive, etfs
from minidisk.daemon.config import DaemonConfig, socket_activated
from minidisk.daemon.control import Control
from minidisk.daemon.lifecycle import (
    Readiness,
    exit_with_parent,
    notify_systemd,
    remove_pid_file,
    write_pid_file,
)
from minidisk.device.api import BlockDevice
from minidisk.device.file import FileDevice
from minidisk.device.memory import MemoryDevice
from minidisk.device.null import NullDevice
from minidisk.dlm.service import DlmService, start_dlm_service
from minidisk.dm import control as dm_control
from minidisk.dm.mapped import MappedDevice
from minidisk.dm.registry import Registry
from minidisk.link.authority import LinkAuthority
from minidisk.link.directory import Directory
from minidisk.link.governance import Governance
from minidisk.namespace import DEFAULT_CACHE_LIMIT, Namespace, apply_all
from minidisk.namespace.hostdev import open_host
from minidisk.nbd.client import RemoteDevice
from minidisk.nbd.exports import Access, Administrators, ExportPolicy, Identity, authenticated
from minidisk.nbd.negotiation import TLSMode
from minidisk.nbd.server import NBDServer, new_event_loop
from minidisk.nbd.stats import LATENCY_SAMPLE
from minidisk.nbd.tls import server_context
from minidisk.nbd.uri import format_uri

if TYPE_CHECKING:
    from minidisk.daemon.metrics import MetricsEndpoint

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.parent = os.getppid()  # who started us, for --exit-with-parent
        self.stop = asyncio.Event()
        self.namespace = Namespace(config.ram if config.ram is not None else DEFAULT_CACHE_LIMIT)
        self.dm = Registry(source=self.namespace, publisher=self.namespace)
        self.control = Control()
        tls = None
        if config.tls_certificates and config.tls_mode is not TLSMode.OFF:
            tls = server_context(config.tls_certificates, config.tls_verify_peer)
        # Export policies, all of which must allow a connection (later layers add theirs:
        # the link layer admits only identities with a live link).
        self.policies: list[ExportPolicy] = []
        self.admins = Administrators(frozenset(config.admin_subjects))
        # With the link layer, any authenticated peer may send control commands
        # (Control.admin then keeps all but the link commands for administrators).
        control_policy = self._admin_or_authenticated if config.directory else self.admins
        self.server = NBDServer(self.namespace, read_only=config.read_only,
                                tls_mode=config.tls_mode, tls_context=tls, control=self.control,
                                policy=self._policy, control_policy=control_policy,
                                busy_poll=config.busy_poll_us / 1e6,
                                max_connections=config.max_connections,
                                handshake_timeout=config.handshake_timeout,
                                peer_timeout=config.peer_timeout,
                                payload_budget=config.payload_budget)
        self.control.add("halt", self._halt)
        self.control.add("exports", self._exports)
        self.control.add("clients", self._clients)
        self.control.add("stats", self._stats)
        self.control.update(etfs.control_handlers(self.namespace))
        self.control.update(dm_control.control_handlers(self.dm))
        self.dlm: DlmService | None = None
        self.metrics: MetricsEndpoint | None = None
        self.links: LinkAuthority | None = None
        if config.directory:
            self._start_link_layer(config.directory)

    def _start_link_layer(self, path: str) -> None:
        """--directory: the directory's disks served here may be opened only by their owners
        and by identities with a live link (minidisk.link.authority)."""
        self.links = LinkAuthority(Directory(path), self.config.link_dlm or self.config.dlm,
                                   self.server, self._serves, self.admins,
                                   lease=self.config.link_lease)
        self.policies.append(self.links.policy)
        # ... and wherever their bytes appear under another name (minidisk.link.governance).
        governance = Governance(self.links.disks, self.namespace, self.dm)
        self.namespace.host_checks.append(governance.check_host)
        self.dm.child_checks.append(governance.check_table_child)
        self.policies.append(governance.policy)
        self.control.admin = self.admins
        for name, handler in self.links.control_handlers().items():
            self.control.add_for_anyone(name, handler)

    def _admin_or_authenticated(self, identity: Identity) -> bool:
        return self.admins(identity) or authenticated(identity)

    def _serves(self, key: str) -> bool:
        return key.lstrip("/") in self.namespace.export_names()

    async def populate(self) -> None:
        """Create every device the configuration names; on error, undo what was made."""
        c, ns = self.config, self.namespace
        try:
            for key, size in c.memory:
                ns.register_device(key, MemoryDevice(size), f"memory {size} bytes")
            for key, size in c.null:
                ns.register_device(key, NullDevice(size))
            for key, path, offset, length in c.files:
                # By descriptor, refusing a symlink, as drivespec host paths are (hostpath.py).
                device = FileDevice(path, offset, length, c.read_only, fd=open_host(path))
                if device.caps.read_only and not c.read_only:
                    if c.read_write:
                        await device.close()
                        raise OSError(errno.EACCES, f"--file {key}={path}: opened read-only; "
                                                    "--read-write refuses to serve it so")
                    log.info("--file %s=%s: not writable: serving it read-only", key, path)
                ns.register_device(key, device)
            await apply_all(c.drives, ns)
            for key, uri in c.remotes:
                ns.register_device(key, await RemoteDevice.connect(uri))
            for name, path in c.tables:
                await dm_control.create_from_table_file(self.dm, name, path)
        except BaseException:
            await self.close_devices()
            raise

    def _policy(self, identity: Identity, name: str) -> Access:
        """The strictest answer of every registered policy."""
        access = Access.READ_WRITE
        for policy in self.policies:
            answer = policy(identity, name)
            if answer is Access.DENY:
                return answer
            if answer is Access.READ_ONLY:
                access = answer
        return access

    @staticmethod
    def _suspended(device: BlockDevice) -> bool:
        """A suspended mapped device: not flushed at halt (it would wait for a resume)."""
        return isinstance(device, MappedDevice) and device.suspended

    def clients(self, with_stats: bool = False) -> list[dict[str, Any]]:
        """The connections that have opened an export: who, which, since when, how busy
        (and, `with_stats`, their request figures)."""
        rows = []
        for conn in self.server.connections:
            identity, export = conn.identity, conn.export
            if identity is None or export is None:
                continue  # still negotiating, or a control connection
            rows.append({"peer": describe_peer(identity), "export": export.name.lstrip("/"),
                         "writable": conn.writable, "since": conn.since,
                         "in_flight": conn.inflight,
                         **({"commands": conn.stats.to_json()} if with_stats else {})})
        return sorted(rows, key=lambda row: (row["since"], row["peer"]))

    async def _clients(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"clients": self.clients()}

    async def _stats(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"exports": self.server.stats(), "connections": self.clients(with_stats=True),
                "latency_sample": LATENCY_SAMPLE}

    async def _halt(self, args: dict[str, Any]) -> dict[str, Any]:
        """Sync, then stop -- also when a device cannot be flushed (a remote export whose
        server died): the caller is told what was not flushed, the server stops anyway.
        With clients connected it refuses (EBUSY, naming them) unless `force`: their
        devices would fail under them, as `nbd-server` users expect a refusal."""
        connected = self.clients()
        if connected and not args.get("force"):
            shown = ", ".join(f"{row['peer']} on {row['export']}" for row in connected[:5])
            more = f" and {len(connected) - 5} more" if len(connected) > 5 else ""
            raise OSError(errno.EBUSY, f"{len(connected)} client(s) connected ({shown}{more}): "
                                       "`halt --force` stops the server anyway")
        errors = []
        try:
            await self.namespace.sync(self._suspended)
        except OSError as e:
            log.error("halt: %s", e.strerror or e)
            errors.append(str(e.strerror or e))
        self.stop.set()
        return {"pid": os.getpid(), "errors": errors}

    async def _exports(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"exports": [{"name": row.key.lstrip("/"), "size": row.size,
                             "description": row.description}
                            for row in self.namespace.ls() if row.size is not None]}

    async def close_devices(self) -> None:
        try:
            await self.dm.remove_all(force=True)
        finally:
            await self.namespace.aclose(self._suspended)

    async def run(self, readiness: Readiness | None) -> int:
        """Serve until stopped; the exit status (a --run command's own, else 0)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        if self.config.exit_with_parent:
            exit_with_parent(self.parent)
        run_dir = None
        urls = self.config.urls
        if self.config.run is not None and not urls and not socket_activated():
            run_dir = tempfile.mkdtemp(prefix="minidisk-run-")  # 0700, ours alone
            urls = [f"unix://{run_dir}/nbd.sock"]
        try:
            return await self._serve(readiness, urls)
        finally:
            if self.config.pid_file:
                remove_pid_file(self.config.pid_file)
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)

    async def _serve(self, readiness: Readiness | None, urls: list[str]) -> int:
        await self.populate()
        try:
            if self.config.dlm:
                self.dlm = await start_dlm_service(self.config.dlm)
            await self.server.start(urls)
            if self.links is not None:
                # Linking is for every local user; the export policy, not the socket's
                # permissions, decides who gets what (ungoverned exports: administrators).
                for path in self.server.unix_paths:
                    os.chmod(path, 0o666)
            if self.config.metrics:
                from minidisk.daemon.metrics import FiguresCollector, MetricsEndpoint

                self.metrics = MetricsEndpoint(FiguresCollector(
                    self.server.stats,
                    lambda: self.dlm.figures if self.dlm is not None else None))
                await self.metrics.start(self.config.metrics)
                log.info("metrics on http://%s:%d/metrics", *self.metrics.address())
            if self.config.pid_file:
                write_pid_file(self.config.pid_file)
        except BaseException:
            await self.server.shutdown()
            await self.close_services()
            raise
        uris = self.client_uris()
        if readiness is not None:
            readiness.ready(uris if self.config.print_uri else ())
        elif self.config.print_uri:
            print("\n".join(uris), flush=True)
        notify_systemd(f"READY=1\nMAINPID={os.getpid()}")
        log.info("serving %s on %s", ", ".join(self.namespace.export_names()),
                 " ".join(urls) or "an inherited socket")
        releaser = asyncio.ensure_future(self._release_suspended_at_stop())
        command = None
        if self.config.run is not None:
            addresses = self.server.listeners.addresses()
            names = self.namespace.export_names()
            env = captive.variables(uris, addresses[0] if addresses else None,
                                    names[0] if names else "")
            command = asyncio.ensure_future(captive.run_command(self.config.run, env))
            command.add_done_callback(lambda _: self.stop.set())
        status = 0
        try:
            await self.server.serve_until(self.stop)
        finally:
            releaser.cancel()
            if command is not None:
                if command.done():
                    status = command.result()
                else:  # stopped first (a signal, halt): the command goes too
                    command.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await command
                    status = 1
        await self.close_services()
        return status

    def client_uris(self) -> list[str]:
        """The URI of each export at each listening socket (--print-uri, --run's $uri)."""
        tls = self.config.tls_mode is TLSMode.REQUIRE
        names = self.namespace.export_names() or [""]
        uris = []
        for address in self.server.listeners.addresses():
            if isinstance(address, str):
                address = os.path.abspath(address)
            uris += [format_uri(address, name, tls) for name in names]
        return uris

    async def _release_suspended_at_stop(self) -> None:
        """Once stopping, requests queued on a suspended mapped device fail (ESHUTDOWN)
        instead of holding the server's shutdown until its timeout: no resume will come."""
        await self.stop.wait()
        for device in list(self.dm.devices.values()):
            if device.suspended:
                device.revoke()

    async def close_services(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
        if self.links is not None:
            await self.links.aclose()
        if self.dlm is not None:
            await self.dlm.close()
        await self.close_devices()


def describe_peer(identity: Identity) -> str:
    """A connection's peer in one short phrase: its certificate subject, process or address."""
    if identity.subject:
        return identity.subject
    if identity.pid is not None:
        return f"pid {identity.pid} (uid {identity.uid})"
    return identity.address or identity.transport.name.lower()


def run_daemon(config: DaemonConfig, readiness: Readiness | None) -> int:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(Daemon(config).run(readiness))
    except (OSError, ValueError) as e:
        message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if readiness is not None:
            readiness.failed(message)
        else:
            print(f"minidisk serve: {message}", file=sys.stderr)
        return 1
    finally:
        loop.close()
