"""`minidisk automount /vmlink [--timeout S]` and `--program-map KEY` (see
minidisk.link.automount)."""

from __future__ import annotations

import os

import click

from minidisk.cli.common import (
    FOREGROUND_HELP,
    LOG_FILE_HELP,
    fail,
    require_server,
    run_as_daemon,
    server_option,
)
from minidisk.control_client import TLS_ENV
from minidisk.link import linker
from minidisk.link.asuser import LocalUser
from minidisk.link.autofs import NO_AUTOFS, kernel_has_autofs
from minidisk.link.automount import Automounter, program_map_entry


@click.command()
@server_option
@click.argument("root", required=False, default="/vmlink")
@click.option("--timeout", default=300, show_default=True, type=click.IntRange(1),
              help="Seconds a disk may stay unused before it is unmounted and unlinked.")
@click.option("--tls-certificates", metavar="DIR", envvar=TLS_ENV,
              help="Client certificate directory (default: $MINIDISK_TLS_CERTIFICATES, as "
              "for control commands): TLS for the link and for the disk's data.")
@click.option("--program-map", "key", metavar="KEY",
              help="Instead: link KEY and print an autofs map entry for it (for the stock "
              "automount daemon's program maps).")
@click.option("-f", "--foreground", is_flag=True, help=FOREGROUND_HELP)
@click.option("--log-file", metavar="FILE", help=LOG_FILE_HELP)
def automount(server: str | None, root: str, timeout: int, tls_certificates: str | None,
              key: str | None, foreground: bool, log_file: str | None) -> None:
    """Serve ROOT (default /vmlink): entering ROOT/owner.disk links and mounts the disk.

    It detaches once ROOT is mounted (-f: stays in the foreground) and serves until SIGTERM
    or Ctrl-C, then unmounts and unlinks everything.
    """
    url = require_server(server)
    if key is not None:
        try:
            entry = program_map_entry(key, url, tls_certificates, _map_requester(),
                                      os.path.join(os.getcwd(), key))
        except (ValueError, linker.LinkError) as e:
            fail(str(e))  # no output and a non-zero exit: the map lookup fails (ENOENT)
        click.echo(entry)
        return
    if os.geteuid() != 0:
        fail("the automounter mounts file systems: run it as root")
    if not kernel_has_autofs():
        fail(NO_AUTOFS.format(release=os.uname().release))
    run_as_daemon("minidisk automount", foreground, log_file, lambda ready: Automounter(
        root, url, timeout, tls_certificates).run(on_ready=lambda: ready("")))


def _map_requester() -> LocalUser | None:
    """Who looked the key up, as automount(8) tells a program map: AUTOFS_UID and AUTOFS_GID
    (UID and GID when it runs with force_standard_program_map_env). None when run by hand:
    for the caller. From root's environment only: any other caller cannot become another
    user anyway, and its keeper would fail to."""
    for prefix in ("AUTOFS_", ""):
        uid, gid = os.environ.get(f"{prefix}UID"), os.environ.get(f"{prefix}GID")
        if uid is not None and gid is not None:
            if not (uid.isdigit() and gid.isdigit()):
                fail(f"{prefix}UID={uid!r} {prefix}GID={gid!r}: not a uid and gid")
            return LocalUser(int(uid), int(gid))
    return None


def register(cli: click.Group) -> None:
    cli.add_command(automount)
