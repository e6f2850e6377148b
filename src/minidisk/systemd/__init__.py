"""systemd units shipped with the package, and `minidisk units` to install them.

The files here name the minidisk executable as @MINIDISK@: a pip-installed package does not
know where its console script lives until it runs (/usr/local/bin, a virtualenv's bin), so
`install_units` writes them with the running command's own path. The server units are
templates over a TOML configuration (daemon/config.py): `minidisk@NAME.service` serves
/etc/minidisk/NAME.toml, started by `minidisk@NAME.socket` on first connection if enabled
(systemd socket activation, which the server accepts as it is). The server tells systemd it
is ready (Type=notify, sd_notify READY=1) once it serves, as detaching does for a shell.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

PLACEHOLDER = "@MINIDISK@"
UNITS = ("minidisk@.service", "minidisk@.socket", "minidisk-dlm.service",
         "minidisk-automount.service")


def unit_text(name: str, executable: str) -> str:
    """The unit file `name` with ExecStart naming `executable`."""
    if name not in UNITS:
        raise ValueError(f"no unit {name!r}; there are {', '.join(UNITS)}")
    text = resources.files(__package__).joinpath(name).read_text()
    return text.replace(PLACEHOLDER, executable)


def install_units(directory: Path, executable: str) -> list[Path]:
    """Write every unit into `directory` (e.g. /etc/systemd/system); the paths written. Each
    is replaced atomically, so systemd never reads half a unit."""
    written = []
    for name in UNITS:
        target = directory / name
        partial = directory / f".{name}.{os.getpid()}.tmp"
        partial.write_text(unit_text(name, executable))
        partial.chmod(0o644)
        os.replace(partial, target)
        written.append(target)
    return written
