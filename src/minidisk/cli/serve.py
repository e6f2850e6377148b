"""`minidisk serve` (start a server) and `minidisk halt` (sync and stop one)."""

from __future__ import annotations

import sys
from typing import Any

import click

from minidisk.cli.common import fail, require_server, server_option
from minidisk.daemon import control
from minidisk.daemon.daemon import DaemonConfig, run_daemon
from minidisk.daemon.lifecycle import detach


@click.command()
@click.option("-s", "foreground", is_flag=True, help="Stay in the foreground.")
@click.option("--memory", "memory", multiple=True, metavar="KEY=SIZE",
              help="A sparse memory disk, e.g. --memory /dev/dk=1G.")
@click.option("--file", "files", multiple=True, metavar="KEY=PATH[:OFFSET:LENGTH]",
              help="A host file, whole or a window of it.")
@click.option("--read-only", is_flag=True, help="Serve every export read-only.")
@click.option("--tls", type=click.Choice(["off", "on", "require"]), default="off",
              show_default=True)
@click.option("--tls-certificates", metavar="DIR",
              help="ca-cert.pem, server-cert.pem and server-key.pem.")
@click.option("--tls-verify-peer", is_flag=True, help="Require client certificates.")
@click.option("--log-file", metavar="FILE", help="Where a detached server logs.")
@click.argument("urls", nargs=-1, metavar="URL")
def serve(foreground: bool, urls: tuple[str, ...], log_file: str | None, **opts: Any) -> None:
    """Serve block devices over NBD at URL (unix://PATH, tcp://IP:PORT/, or - for stdio).

    Detaches once the server accepts connections, unless -s is given. Started by systemd
    socket activation (nbdinfo -- [ minidisk serve ... ]) it serves the inherited socket.
    """
    try:
        config = DaemonConfig.from_options(list(urls), **opts)
    except ValueError as e:
        fail(str(e), code=2)
    if foreground or config.must_stay_in_foreground():
        sys.exit(run_daemon(config, None))
    sys.exit(detach(lambda readiness: run_daemon(config, readiness), log_file))


@click.command()
@server_option
@click.argument("url", required=False)
def halt(server: str | None, url: str | None) -> None:
    """Flush caches, sync host files and stop the server at URL (or --server)."""
    try:
        control.call(require_server(server, url), "halt")
    except control.ControlError as e:
        fail(str(e))


def register(cli: click.Group) -> None:
    cli.add_command(serve)
    cli.add_command(halt)
