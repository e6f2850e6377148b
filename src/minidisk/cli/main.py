"""The `minidisk` command: a click group that gathers the command modules, importing each lazily.

A command imports only the module that defines it: `minidisk detach` must not pay for the
server, the lock manager and the linker (≈300 modules, 10 s of Python in a TCG guest, where the
kernel tests run). `minidisk --help` imports none of them: the listing below carries each
command's one-line help (tests/kernel/test_cli_lazy.py checks it against the commands).
"""

from __future__ import annotations

import importlib
import logging
import os

import click

# command → (its module under minidisk.cli, the line `minidisk --help` shows for it)
COMMANDS: dict[str, tuple[str, str]] = {
    "attach": ("kernel", "Bring NBD export URI online as a kernel block device and print its "
                         "path."),
    "automount": ("automount", "Serve ROOT (default /vmlink): entering ROOT/owner.disk links and "
                               "mounts the disk."),
    "clients": ("serve", "The clients connected to a server: peer, export, mode, since, in "
                         "flight."),
    "detach": ("kernel", "Undo `minidisk attach` for DEVICE, such as /dev/loop3."),
    "directory": ("link", "Owners, disks, passwords and grants: who may link what (z/VM's user "
                          "directory)."),
    "dlm": ("dlm", "The lock manager (VMS/Linux DLM semantics)."),
    "dlmfs": ("dlm", "Mount the lock file system (OCFS2 dlmfs semantics) on MOUNTPOINT; it "
                     "detaches once mounted, unless -f."),
    "dmsetup": ("dmsetup", "Device-mapper on a running server, with dmsetup's commands and "
                           "output."),
    "etfs": ("serve", "Change the namespace of a running server (as rump_etfs)."),
    "halt": ("serve", "Flush caches, sync host files and stop the server at URL (or --server)."),
    "link": ("link", "Link DISK (owner.disk), attach it and, given MOUNTPOINT, mount it (ro for "
                     "read links)."),
    "man": ("manpages", "Manual pages made from the commands: print COMMAND's (troff; `man -l -` "
                        "shows it), or write them all with --install DIR."),
    "quickstart": ("quickstart", "Serve a memory disk, attach it, mkfs.ext4, mount, write and "
                                 "read, show status."),
    "quickstart-vmlink": ("vmlink_demo", "Serve alice's disk, grant it, and read a file by "
                                         "entering /vmlink/alice.0191."),
    "replay-log": ("replaylog", "Replay a log-writes log onto a device, up to an entry or a mark "
                              "(xfstests style)."),
    "serve": ("serve", "Serve block devices over NBD at URL (unix://PATH, tcp://IP:PORT/, or - "
                       "for stdio)."),
    "top": ("serve", "A live view of a server: per export and command, requests and bytes per "
                     "second, errors, connections; drawn in place by rich on a terminal, one "
                     "block per update otherwise."),
    "units": ("units", "The systemd units: a templated server (minidisk@NAME.service over "
                       "/etc/minidisk/NAME.toml), its socket, the lock manager's and the "
                       "automounter's."),
    "stats": ("serve", "Requests, bytes, errors and latency per export and command (as nbdkit's "
                       "stats)."),
    "unlink": ("link", "Unmount, detach and unlink TARGET (owner.disk or its mount point), in "
                       "that order."),
}


class LazyGroup(click.Group):
    """A group whose commands are registered by their module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module = importlib.import_module(f"minidisk.cli.{COMMANDS[cmd_name][0]}")
            module.register(self)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click.Group's own layout and shortening, fed from the table instead of the modules.
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit))
                for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.version_option(package_name="minidisk", message="%(prog)s %(version)s")
def cli(verbose: int) -> None:
    """Userspace block storage for Linux."""
    logging.getLogger().setLevel(log_level(verbose))
    # journald stamps every line itself; a terminal or a log file needs the time.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(format=stamp + "minidisk[%(process)d] %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z")


def log_level(verbose: int) -> int:
    """WARNING; INFO for -v, DEBUG for -vv (`minidisk -v serve` and `serve -v` alike)."""
    return max(logging.WARNING - 10 * verbose, logging.DEBUG)


def main() -> None:
    cli(prog_name="minidisk", auto_envvar_prefix=None,
        obj={"server": os.environ.get("MINIDISK_SERVER")})
