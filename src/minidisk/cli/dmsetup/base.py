"""The `minidisk dmsetup` group and what its commands share: the invocation (server,
verbosity, the device chosen by -u or -j/-m), the control call, and dmsetup's words for a
failure.

A failure prints what dmsetup prints — `device-mapper: <op> ioctl on <name>  failed:
<strerror>` — then `Command failed.`, and exits 1; the reason is in the server's log, as the
kernel's is in its log.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from minidisk.cli.common import require_server, server_option
from minidisk.cli.dmsetup.usage import USAGE
from minidisk.cli.progress import Progress
from minidisk.dm import report
from minidisk.dm.commands import DmCommand

MAX_NAME = 127  # DM_NAME_LEN - 1


@dataclass
class Invocation:
    """One run of `minidisk dmsetup`: the server, -v, and the -u UUID / -j MAJOR -m MINOR of
    the command being run (see `select_options`)."""

    server: str | None
    verbose: int
    uuid: str | None = None
    major: int | None = None
    minor: int | None = None

    def selection(self) -> tuple[dict[str, Any], str] | None:
        """The device chosen by -u or -j/-m, as control arguments and as error messages
        name it; None if neither was given."""
        if self.uuid is not None:
            return {"uuid": self.uuid}, f"UUID {self.uuid}"
        if self.major is None and self.minor is None:
            return None
        if self.major is None or self.minor is None:
            raise click.UsageError("-j MAJOR and -m MINOR go together")
        return {"major": self.major, "minor": self.minor}, f"({self.major}:{self.minor})"

    def device(self, name: str | None) -> tuple[dict[str, Any], str | None]:
        """NAME when given (as in dmsetup, a name wins), else -u or -j/-m; ({}, None) when
        none is: the commands that take that as 'every device' do so."""
        if name is not None:
            return {"name": name}, name
        return self.selection() or ({}, None)

    def leading_device(self, args: tuple[str, ...]) -> tuple[dict[str, Any], str,
                                                              tuple[str, ...]]:
        """For commands with arguments after the device (load, wait, message): with -u or
        -j/-m every argument is the command's own; otherwise the first one names the
        device. Returns the device, its label and the remaining arguments."""
        selection = self.selection()
        if selection is not None:
            return selection[0], selection[1], args
        if not args:
            no_device()
        return {"name": args[0]}, args[0], args[1:]

    def each_device(self, names: tuple[str, ...]) -> list[tuple[dict[str, Any], str]]:
        """The devices of a command that takes several names, or the one -u or -j/-m
        choose."""
        if names:
            return [({"name": name}, name) for name in names]
        selection = self.selection()
        if selection is None:
            no_device()
        return [selection]

    def call(self, command: DmCommand, args: dict[str, Any], op: str,
             name: str | None = None, devno: str = "") -> dict[str, Any]:
        """The control command, or dmsetup's words for its failure and exit 1."""
        from minidisk.control_client import ControlError, call

        # A resume may take long (integrity's recalculate, a thin pool's first format): on a
        # terminal a wait past a second shows; elsewhere dmsetup's output stays its own.
        try:
            with Progress(f"dmsetup {op} {name or ''}".rstrip(), plain=False):
                return call(require_server(self.server), command, args)
        except ControlError as e:
            if e.errno == errno.ENXIO and op in ("info", "status"):  # dmsetup's own words
                refuse("Device does not exist.")
            failed(op, name, e.errno, devno)

    def gather(self, command: DmCommand, op: str, names: tuple[str, ...],
               extra: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], bool]:
        """The devices a listing command reports: each NAME in turn, else the one -u or
        -j/-m choose, else every device; and whether several are meant (dmsetup then
        prefixes lines with `name: `)."""
        extra = extra or {}
        if names:
            out: list[dict[str, Any]] = []
            for name in names:
                out += self.call(command, {"name": name, **extra}, op, name)["devices"]
            return out, len(names) > 1
        device, label = self.device(None)
        return self.call(command, {**device, **extra}, op, label)["devices"], label is None


def no_device() -> NoReturn:
    refuse("No device specified.")  # dmsetup's words


def refuse(message: str) -> NoReturn:
    click.echo(message, err=True)
    click.echo("Command failed.", err=True)
    sys.exit(1)


def failed(op: str, name: str | None, err: int | None, devno: str = "") -> NoReturn:
    """dmsetup's words for a failed ioctl: the errno only, with the device's number when
    the request gave one (a create with -j/-m, the load of a create)."""
    refuse(f"device-mapper: {op} ioctl on {name or ''} {devno} failed: {strerror(err)}")


def strerror(err: int | None) -> str:
    return os.strerror(err if err is not None else errno.EIO)


def too_many(rest: tuple[str, ...], allowed: int) -> None:
    if len(rest) > allowed:
        raise click.UsageError(f"unexpected extra arguments: {' '.join(rest[allowed:])}")


def uint_arg(word: str, what: str) -> int:
    if not word.isdigit():
        raise click.BadParameter(f"{word!r} is not a non-negative integer", param_hint=what)
    return int(word)


def usage_exit(ctx: click.Context, words: str) -> NoReturn:
    """dmsetup's words and status for a command line it cannot run, then its usage."""
    click.echo(words, err=True)
    click.echo(USAGE, err=True, nl=False)
    ctx.exit(1)
    raise AssertionError("unreachable")  # ctx.exit raises


UDEV_FLAGS = ("--noudevsync", "--noudevrules", "--verifyudev")


class DmsetupGroup(click.Group):
    """dmsetup takes its udev flags before or after any command; so do we, and ignore them:
    no udev watches our devices (/dev/mapper/NAME is a namespace key, made and removed
    with the device), so there is nothing to wait for or to tell."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(self._udev_flags())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None:
            usage_exit(ctx, "Unknown command.")
        return found

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(self._udev_flags())
        super().add_command(cmd, name)

    @staticmethod
    def _udev_flags() -> list[click.Parameter]:
        return [click.Option([flag], is_flag=True, expose_value=False,
                             help="Accepted and ignored: there is no udev here.")
                for flag in UDEV_FLAGS]


@click.group(name="dmsetup", cls=DmsetupGroup, invoke_without_command=True)
@server_option
@click.option("-v", "--verbose", count=True, help="Show device info with results.")
@click.option("--version", "show_version", is_flag=True, help="The same as `version`.")
@click.pass_context
def dmsetup(ctx: click.Context, server: str | None, verbose: int, show_version: bool) -> None:
    """Device-mapper on a running server, with dmsetup's commands and output.

    There is no udev here: mapped devices are namespace keys (/dev/mapper/NAME), so the
    udev flags are accepted and ignored, and the udev commands have nothing to do."""
    ctx.obj = Invocation(server or (ctx.obj or {}).get("server"), verbose)
    if ctx.invoked_subcommand is None:
        if show_version:
            click.echo(report.version(ctx.obj.call(DmCommand.VERSION, {}, "version")),
                       nl=False)
            ctx.exit(0)
        click.echo(USAGE, err=True, nl=False)  # as dmsetup without a command: status 1
        ctx.exit(1)


pass_invocation = click.make_pass_decorator(Invocation)
F = TypeVar("F", bound=Callable[..., Any])


def _keep_selection(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None and param.name is not None:
        setattr(ctx.find_object(Invocation), param.name, value)


def select_options(func: F) -> F:
    """-u UUID, -j MAJOR -m MINOR: choose the device by UUID or number (as `info` prints
    it) instead of by name. Kept on the Invocation rather than passed to each command,
    since what they mean for the command's other arguments is the same everywhere."""
    for decls, kind, metavar, text in (
        (("-m", "--minor"), click.IntRange(min=0), "MINOR", "Device minor number (with -j)."),
        (("-j", "--major"), click.IntRange(min=0), "MAJOR", "Device major number (with -m)."),
        (("-u", "--uuid"), click.STRING, "UUID", "Choose the device by its UUID."),
    ):
        func = click.option(*decls, type=kind, metavar=metavar, expose_value=False,
                            callback=_keep_selection, help=text)(func)
    return func
