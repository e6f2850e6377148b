"""`minidisk serve` (start a server), `minidisk halt` (sync and stop one), `minidisk etfs`."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import click

from minidisk import control_client
from minidisk.cli.common import echo_table, fail, printable, require_server, server_option
from minidisk.daemon.config import DaemonConfig
from minidisk.daemon.daemon import run_daemon
from minidisk.daemon.lifecycle import detach
from minidisk.namespace import RUMP_ETFS_SIZE_ENDOFF, SizeError, parse_size
from minidisk.nbd.listen import parse_url
from minidisk.nbd.transport import Transport


@click.command()
@click.option("-v", "--verbose", count=True, help="More log output (repeatable), as "
              "`minidisk -v`.")
@click.option("-s", "-f", "--foreground", "foreground", is_flag=True,
              help="Stay in the foreground (-s as rump_server, -f as nbdkit).")
@click.option("-d", "drive", multiple=True, metavar="DRIVESPEC",
              help="key=/KEY,hostpath=PATH,size=SIZE|disklabel=L|partition=N,offset=,type=")
@click.option("--memory", multiple=True, metavar="KEY=SIZE",
              help="A sparse memory disk, e.g. --memory /dev/dk=1G.")
@click.option("--null", multiple=True, metavar="KEY=SIZE",
              help="A sink: writes vanish, reads return zeroes (benchmarks, copy tests).")
@click.option("--file", multiple=True, metavar="KEY=PATH[:OFFSET:LENGTH]",
              help="A host file, whole or a window of it.")
@click.option("--nbd", multiple=True, metavar="KEY=NBD-URI",
              help="Another NBD server's export, served here as a device.")
@click.option("--table", multiple=True, metavar="NAME=FILE",
              help="A device-mapper table (dmsetup syntax) for /dev/mapper/NAME.")
@click.option("-r", "ram", metavar="TOTAL_RAM", help="Memory for block caches (e.g. 64m).")
@click.option("--config", "config_file", metavar="FILE", help="A TOML file of these options.")
@click.option("--read-only", is_flag=True, default=None, help="Serve every export read-only.")
@click.option("--read-write", is_flag=True, default=None,
              help="A --file this user may not write is an error (by default it is served "
                   "read-only, with a warning, as nbdkit's file plugin does).")
@click.option("--tls", type=click.Choice(["off", "on", "require"]), default=None,
              help="TLS policy (default off).")
@click.option("--tls-certificates", metavar="DIR",
              help="ca-cert.pem, server-cert.pem and server-key.pem.")
@click.option("--tls-verify-peer", is_flag=True, default=None,
              help="Require client certificates.")
@click.option("--admin-subject", multiple=True, metavar="SUBJECT",
              help="A TLS client certificate subject (CN=...,O=...) allowed to run control "
                   "commands (halt, etfs, dmsetup). Repeatable.")
@click.option("--busy-poll-us", type=click.IntRange(0, 10_000), metavar="US",
              help="After each request and reply keep polling this long before sleeping: "
                   "about halves queue-depth-1 latency on a VM, at the price of CPU "
                   "(default 0: off).")
@click.option("--max-connections", type=click.IntRange(1, 1_000_000), metavar="N",
              help="Open connections at most; a client over the limit is closed before the "
                   "greeting (default 1024; also the listen backlog).")
@click.option("--handshake-timeout", type=click.IntRange(0, 86_400), metavar="SECONDS",
              help="A client that has not reached transmission (or run a control command) "
                   "by then is disconnected (default 10; 0: no deadline).")
@click.option("--peer-timeout", type=click.IntRange(0, 86_400), metavar="SECONDS",
              help="Drop a peer that stops answering after about this long: a TCP host "
                   "gone (keepalive, TCP_USER_TIMEOUT), or a client holding payload budget "
                   "that stops sending its WRITE or reading its replies (default 120; "
                   "0: off).")
@click.option("--payload-budget", metavar="SIZE",
              help="READ and WRITE payload bytes all clients together may have in memory; "
                   "more wait, unread (default 512M; 64M at most per connection).")
@click.option("--log-file", metavar="FILE", help="Where a detached server logs.")
@click.option("--pid-file", "-P", metavar="FILE",
              help="Write the server's pid here once it serves; removed when it stops.")
@click.option("--print-uri", is_flag=True, default=None,
              help="Once serving, print each export's client URI on stdout (as nbdkit).")
@click.option("--run", metavar="CMD",
              help="Captive mode (nbdkit's): serve, run the shell command CMD with $uri, "
                   "$sock (or $port) and $exportname set, stop when it exits, exit with its "
                   "status. Without a URL the socket is private and temporary.")
@click.option("--metrics", metavar="URL",
              help="Serve Prometheus metrics (the figures of `minidisk stats`) over HTTP at "
                   "tcp://IP:PORT/, path /metrics.")
@click.option("--exit-with-parent", is_flag=True, default=None,
              help="Stop when the process that started the server exits (implies -f).")
@click.option("--dlm", metavar="URL", help="Also host the lock manager at URL (unix://PATH).")
@click.option("--directory", metavar="FILE",
              help="The link directory (SQLite): govern who may link this server's disks.")
@click.option("--link-dlm", metavar="URL",
              help="Lock manager for links (default: --dlm, else $MINIDISK_DLM).")
@click.argument("url", nargs=-1, metavar="URL")
@click.version_option(package_name="minidisk", message="%(prog)s %(version)s")
def serve(verbose: int, foreground: bool, config_file: str | None, **options: Any) -> None:
    """Serve block devices over NBD at URL (unix://PATH, tcp://IP:PORT/, or - for stdio).

    Detaches once the server accepts connections (exit status 0), or exits non-zero with
    the error; -s stays in the foreground. Started by systemd socket activation
    (nbdinfo -- [ minidisk serve ... ]) it serves the inherited socket.
    """
    if verbose:
        from minidisk.cli.main import log_level

        root = logging.getLogger()
        root.setLevel(min(root.level, log_level(verbose)))
    try:
        config = DaemonConfig.load(options, config_file)
    except ValueError as e:
        fail(str(e), code=2)
    _check_paths(config)
    if foreground or config.must_stay_in_foreground():
        sys.exit(run_daemon(config, None))
    sys.exit(detach(lambda readiness: run_daemon(config, readiness), config.log_file))


def _check_paths(config: DaemonConfig) -> None:
    """The paths the server will open, checked before it detaches: one line naming the path
    and what to do, instead of a detached server's traceback or a new empty database."""
    for name, path in config.tables:
        if not os.access(path, os.R_OK):
            fail(f"--table {name}={path}: no readable table file there", code=2)
    for key, path, _, _ in config.files:
        if not os.path.exists(path):
            fail(f"--file {key}={path}: no such file (create it first, e.g. truncate -s 1G "
                 f"{path})", code=2)
        if not config.read_only and not os.access(path, os.W_OK):
            if config.read_write:
                fail(f"--file {key}={path}: not writable by this user: --read-write refuses "
                     "to serve it read-only", code=2)
            click.echo(f"minidisk: warning: --file {key}={path}: not writable by this user: "
                       "serving it read-only", err=True)
    if config.log_file and not os.path.isdir(os.path.dirname(os.path.abspath(config.log_file))):
        fail(f"--log-file {config.log_file}: its directory does not exist", code=2)
    if config.tls_certificates:
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            if not os.path.isfile(os.path.join(config.tls_certificates, name)):
                fail(f"--tls-certificates {config.tls_certificates}: {name} is missing",
                     code=2)
    if config.directory and not os.path.isfile(config.directory):
        fail(f"--directory {config.directory}: no link directory there (create it with "
             "`minidisk directory --directory FILE define ...`)", code=2)


@click.command()
@server_option
@click.argument("url", required=False)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for exit.")
@click.option("--force", is_flag=True,
              help="Stop even while clients are connected (refused otherwise, naming them).")
def halt(server: str | None, url: str | None, timeout: float, force: bool) -> None:
    """Flush caches, sync host files and stop the server at URL (or --server).

    Returns once the server process is gone (when it runs on this machine).
    """
    target = require_server(server, url)
    try:
        result = control_client.call(target, "halt", {"force": True} if force else None)
    except control_client.ControlError as e:
        fail(str(e))
    address = parse_url(target)
    local = address.kind is Transport.UNIX or address.host in ("127.0.0.1", "::1", "0.0.0.0")
    pid = int(result.get("pid", 0))
    errors = [str(e) for e in result.get("errors", [])]
    deadline = time.monotonic() + timeout
    while local and pid and time.monotonic() < deadline:
        if not _running(pid):
            break
        time.sleep(0.02)
    else:
        if local and pid:
            fail(f"server {pid} still running after {timeout:g} s")
    if errors:
        fail("server stopped, but " + "; ".join(errors))


@click.command()
@server_option
@click.argument("url", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def clients(server: str | None, url: str | None, as_json: bool) -> None:
    """The clients connected to a server: peer, export, mode, since, in flight."""
    target = require_server(server, url)
    try:
        rows = control_client.call(target, "clients")["clients"]
    except control_client.ControlError as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("PEER", "EXPORT", "MODE", "SINCE", "IN-FLIGHT")]
    for row in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(row["since"])))
        table.append((printable(str(row["peer"])), printable(str(row["export"])),
                      "rw" if row["writable"] else "ro", since, str(row["in_flight"])))
    echo_table(table)


@click.command()
@server_option
@click.argument("url", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="Everything as JSON: per export and per connection, with histograms.")
def stats(server: str | None, url: str | None, as_json: bool) -> None:
    """Requests, bytes, errors and latency per export and command (as nbdkit's stats)."""
    from minidisk.histogram import percentile_us

    target = require_server(server, url)
    try:
        figures = control_client.call(target, "stats")
    except control_client.ControlError as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    table = [("EXPORT", "CONNS", "COMMAND", "REQUESTS", "BYTES", "ERRORS", "P50_US", "P99_US")]
    for name, export in figures["exports"].items():
        for command, row in export["commands"].items():
            p50 = percentile_us(row["latency_us"], 0.5)
            p99 = percentile_us(row["latency_us"], 0.99)
            errors = ",".join(f"{err}:{n}" for err, n in row["errors"].items()) or "-"
            table.append((printable(name.lstrip("/")), str(export["connections"]), command,
                          str(row["requests"]), str(row["bytes"]), errors,
                          "-" if p50 is None else str(p50), "-" if p99 is None else str(p99)))
    echo_table(table)


@click.command()
@server_option
@click.argument("url", required=False)
@click.option("--interval", "-d", type=click.FloatRange(0.1), default=1.0, show_default=True,
              help="Seconds between updates.")
@click.option("--count", "-n", type=click.IntRange(1), help="Stop after this many updates.")
def top(server: str | None, url: str | None, interval: float, count: int | None) -> None:
    """A live view of a server: per export and command, requests and bytes per second,
    errors, connections; drawn in place by rich on a terminal, one block per update
    otherwise."""
    target = require_server(server, url)
    live = _RichTop() if sys.stdout.isatty() else None
    before: dict[tuple[str, str], tuple[int, int]] = {}
    shown_updates = 0
    then = time.monotonic()
    try:
        while count is None or shown_updates < count:
            try:
                figures = control_client.call(target, "stats")
            except control_client.ControlError as e:
                fail(str(e))
            now = time.monotonic()
            elapsed = max(now - then, 1e-9)
            title = (f"minidisk top: {target}  {time.strftime('%H:%M:%S')}  "
                     f"{len(figures['connections'])} connection(s)")
            rows: list[tuple[str, ...]] = []
            for name, export in figures["exports"].items():
                for command, row in export["commands"].items():
                    key = (name, command)
                    requests, nbytes = row["requests"], row["bytes"]
                    old_requests, old_bytes = before.get(key, (requests, nbytes))
                    rows.append((printable(name.lstrip("/"))[:16], command,
                                 f"{(requests - old_requests) / elapsed:.0f}",
                                 f"{(nbytes - old_bytes) / elapsed / 1e6:.1f}",
                                 str(requests), str(sum(row["errors"].values()))))
                    before[key] = (requests, nbytes)
            then = now
            if live is not None:
                live.show(title, rows)
            else:
                header = tuple(column for column, _ in TOP_COLUMNS)
                lines = [title, *(_plain_row(row) for row in [header, *rows])]
                click.echo("\n".join(lines) + "\n")
            shown_updates += 1
            if count is None or shown_updates < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()


# `top`'s columns and their plain-text alignment (rich's table justifies them the same way).
TOP_COLUMNS = (("EXPORT", "<16"), ("COMMAND", "<12"), ("REQ/S", ">10"), ("MB/S", ">10"),
               ("REQUESTS", ">12"), ("ERRORS", ">8"))


def _plain_row(cells: tuple[str, ...]) -> str:
    return " ".join(format(cell, spec) for cell, (_, spec) in zip(cells, TOP_COLUMNS,
                                                                   strict=True))


class _RichTop:
    """`minidisk top` on a terminal: one rich table, redrawn in place."""

    def __init__(self) -> None:
        from rich.live import Live

        self.live = Live(auto_refresh=False, transient=False)
        self.live.start()

    def show(self, title: str, rows: list[tuple[str, ...]]) -> None:
        from rich.table import Table

        table = Table(title=title, title_justify="left", box=None)
        for column, spec in TOP_COLUMNS:
            table.add_column(column, justify="left" if spec.startswith("<") else "right")
        for row in rows:
            table.add_row(*row)
        self.live.update(table, refresh=True)

    def stop(self) -> None:
        self.live.stop()


def _running(pid: int) -> bool:
    """True while `pid` runs; a zombie (a server that is its caller's own child) has exited."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@click.group()
def etfs() -> None:
    """Change the namespace of a running server (as rump_etfs)."""


@etfs.command("ls")
@server_option
def etfs_ls(server: str | None) -> None:
    """List keys: key, type, host path, window, users."""
    try:
        rows = control_client.call(require_server(server), "etfs.ls")["keys"]
    except control_client.ControlError as e:
        fail(str(e))
    click.echo(f"{'KEY':<24} {'TYPE':<11} {'BEGIN':>12} {'SIZE':>14} {'USERS':>5}  HOSTPATH")
    for row in rows:
        size = "-" if row["size"] is None else str(row["size"])
        click.echo(f"{row['key']:<24} {row['type']:<11} {row['begin']:>12} {size:>14} "
                   f"{row['users']:>5}  {row['hostpath'] or row['description']}")


def _size(text: str | None) -> int | None:
    if text is None or text == "end":
        return None
    try:
        return parse_size(text)
    except SizeError as e:
        fail(str(e), code=2)


@etfs.command("register")
@server_option
@click.option("-t", "--type", "etfs_type", default="blk", show_default=True,
              type=click.Choice(["reg", "blk", "chr", "dir", "dir_subdirs"]))
@click.option("--begin", default="0", help="Window start in the host file.")
@click.option("--size", default=None, help="Window size (default: to the end).")
@click.option("-d", "drivespec", help="Register with a drivespec instead.")
@click.argument("key", required=False)
@click.argument("hostpath", required=False)
def etfs_register(server: str | None, etfs_type: str, begin: str, size: str | None,
                  drivespec: str | None, key: str | None, hostpath: str | None) -> None:
    """Map KEY to HOSTPATH (or -d DRIVESPEC) on a running server."""
    if drivespec:
        args: dict[str, Any] = {"drivespec": drivespec}
    elif key and hostpath:
        length = _size(size)
        args = {"key": key, "hostpath": os.path.abspath(hostpath), "type": etfs_type,
                "begin": _size(begin) or 0,
                "size": RUMP_ETFS_SIZE_ENDOFF if length is None else length}
    else:
        fail("give KEY HOSTPATH or -d DRIVESPEC", code=2)
    try:
        result = control_client.call(require_server(server), "etfs.register", args)
    except control_client.ControlError as e:
        fail(str(e))
    click.echo(result["key"])


@etfs.command("remove")
@server_option
@click.option("-f", "--force", is_flag=True, help="Revoke even while in use.")
@click.argument("key")
def etfs_remove(server: str | None, force: bool, key: str) -> None:
    """Remove KEY (EBUSY while in use, unless -f)."""
    try:
        control_client.call(require_server(server), "etfs.remove", {"key": key, "force": force})
    except control_client.ControlError as e:
        fail(str(e))


def register(cli: click.Group) -> None:
    cli.add_command(serve)
    cli.add_command(halt)
    cli.add_command(clients)
    cli.add_command(stats)
    cli.add_command(top)
    cli.add_command(etfs)
