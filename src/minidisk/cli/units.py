"""`minidisk units`: the systemd units shipped with the package (minidisk.systemd)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from minidisk.cli.common import fail


def _executable() -> str:
    """This command's own path, as the units are to start it."""
    argv0 = os.path.abspath(sys.argv[0])
    if os.path.basename(argv0) == "minidisk" and os.access(argv0, os.X_OK):
        return argv0
    found = shutil.which("minidisk")
    if found:
        return os.path.abspath(found)
    fail("cannot tell where the minidisk command is: run the units command as `minidisk`")


@click.command()
@click.option("--install", "directory", metavar="DIR", type=click.Path(file_okay=False),
              help="Write the units into DIR (e.g. /etc/systemd/system), then run "
                   "`systemctl daemon-reload`.")
@click.option("--show", "name", metavar="UNIT", help="Print one unit as it would be written.")
def units(directory: str | None, name: str | None) -> None:
    """The systemd units: a templated server (minidisk@NAME.service over
    /etc/minidisk/NAME.toml), its socket, the lock manager's and the automounter's."""
    from minidisk.systemd import UNITS, install_units, unit_text

    if directory is not None and name is not None:
        raise click.UsageError("give --install DIR or --show UNIT, not both")
    if name is not None:
        try:
            click.echo(unit_text(name, _executable()), nl=False)
        except ValueError as e:
            fail(str(e), code=2)
        return
    if directory is None:
        for unit in UNITS:
            click.echo(unit)
        return
    if not os.path.isdir(directory):
        fail(f"--install {directory}: no such directory", code=2)
    try:
        for path in install_units(Path(directory), _executable()):
            click.echo(path)
    except OSError as e:
        fail(f"--install {directory}: {e.strerror or e}")


def register(cli: click.Group) -> None:
    cli.add_command(units)
