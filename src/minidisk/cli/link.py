"""`minidisk directory …` (the administrator's side), `minidisk link` and `minidisk unlink`
(the user's side) — see minidisk.link."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import click

from minidisk.cli.common import fail, printable, require_server, server_option
from minidisk.control_client import TLS_ENV
from minidisk.link import linker
from minidisk.link.directory import (
    EVERYONE,
    Directory,
    DirectoryError,
    default_path,
)
from minidisk.link.modes import PasswordClass, parse_link_mode
from minidisk.link.names import (
    parse_key,
    parse_owner,
    parse_principal,
)


def _open(ctx: click.Context, create: bool = False) -> Directory:
    """The directory file; only `define` (the first command of a new directory) makes one, so
    a mistyped --directory fails instead of answering from a new, empty database."""
    path = ctx.obj["directory"] if isinstance(ctx.obj, dict) else default_path()
    if not create and not os.path.exists(path):
        fail(f"directory {path}: no such file (the first `minidisk directory define` makes "
             "it)", code=2)
    try:
        return Directory(path)
    except OSError as e:
        fail(f"directory {path}: {e.strerror or e}")


def _first_line(path: str) -> str:
    lines = Path(path).read_text().splitlines()
    return lines[0] if lines else ""


@click.group()
@click.option("--directory", "path", metavar="FILE", envvar="MINIDISK_DIRECTORY",
              default=None, help="The directory file (default: $MINIDISK_DIRECTORY or "
              "/var/lib/minidisk/directory.sqlite).")
@click.pass_context
def directory(ctx: click.Context, path: str | None) -> None:
    """Owners, disks, passwords and grants: who may link what (z/VM's user directory)."""
    ctx.ensure_object(dict)
    ctx.obj["directory"] = path or default_path()


@directory.command()
@click.argument("name")
@click.option("--identity", metavar="WHO", help="An owner's identity: login name, uid:N or "
              "certificate subject (CN=…). Defining OWNER needs it.")
@click.option("--server", "server_url", metavar="URL",
              help="A disk's server (its control URL, as for --server).")
@click.option("--key", metavar="KEY", help="A disk's namespace key on that server.")
@click.pass_context
def define(ctx: click.Context, name: str, identity: str | None, server_url: str | None,
           key: str | None) -> None:
    """Define OWNER (with --identity) or OWNER.DISK (with --server and --key)."""
    d = _open(ctx, create=True)
    try:
        if "." not in name:
            if not identity:
                fail("defining an owner needs --identity WHO", code=2)
            d.define_owner(parse_owner(name), parse_principal(identity))
        else:
            if not server_url or not key:
                fail("defining a disk needs --server URL and --key KEY", code=2)
            d.define_disk(parse_key(name, partition=False), server_url, "/" + key.lstrip("/"))
    except (ValueError, DirectoryError) as e:
        fail(str(e))


@directory.command()
@click.argument("name")
@click.pass_context
def undefine(ctx: click.Context, name: str) -> None:
    """Remove OWNER (once it has no disks) or OWNER.DISK (and its grants)."""
    d = _open(ctx)
    try:
        if "." in name:
            d.undefine_disk(parse_key(name, partition=False))
        else:
            d.undefine_owner(parse_owner(name))
    except (ValueError, DirectoryError) as e:
        fail(str(e))


@directory.command()
@click.argument("who")
@click.argument("disk")
@click.option("--mode", default="R", show_default=True,
              help="The strongest link mode granted (R RR SR ER W WR SW EW M MR MW SM); "
              "it covers every mode of its password class or a lower one, and the "
              "automounter links in it.")
@click.pass_context
def grant(ctx: click.Context, who: str, disk: str, mode: str) -> None:
    """Let WHO link DISK without a password (a directory LINK statement, an ESM permit)."""
    d = _open(ctx)
    try:
        d.grant(parse_principal(who), parse_key(disk, partition=False), parse_link_mode(mode))
    except (ValueError, DirectoryError) as e:
        fail(str(e))


@directory.command()
@click.argument("who")
@click.argument("disk")
@click.pass_context
def revoke(ctx: click.Context, who: str, disk: str) -> None:
    """Take back WHO's grant on DISK (live links stay until unlinked)."""
    d = _open(ctx)
    try:
        d.revoke(parse_principal(who), parse_key(disk, partition=False))
    except (ValueError, DirectoryError) as e:
        fail(str(e))


@directory.command()
@click.argument("disk")
@click.argument("kind", type=click.Choice([c.value for c in PasswordClass]))
@click.option("--all", "everyone", is_flag=True, help="z/VM's ALL keyword: anyone may link, no "
              "password (a password that reads ALL is only a password).")
@click.option("--none", "nobody", is_flag=True, help="Nobody without a grant may link.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the password from the first line of a file.")
@click.pass_context
def passwd(ctx: click.Context, disk: str, kind: str, everyone: bool, nobody: bool,
           password_file: str | None) -> None:
    """Set DISK's read, write or multi password (asked for unless --all, --none or a file)."""
    if everyone and nobody:
        fail("--all and --none exclude each other", code=2)
    if (everyone or nobody) and password_file is not None:
        fail("--password-file and --all/--none exclude each other", code=2)
    password: str | None = None
    if password_file is not None:
        password = _first_line(password_file)
    elif not everyone and not nobody:
        password = click.prompt(f"{kind} password for {disk}", hide_input=True,
                                confirmation_prompt=True)
    if password == "":
        fail("empty password: use --none or --all", code=2)
    d = _open(ctx)
    try:
        key = parse_key(disk, partition=False)
        if everyone:
            d.allow_everyone(key, PasswordClass(kind))
        else:
            d.set_password(key, PasswordClass(kind), password)
    except (ValueError, DirectoryError) as e:
        fail(str(e))


@directory.command(name="ls")
@click.option("--audit", is_flag=True, help="Show the audit log instead.")
@click.pass_context
def ls(ctx: click.Context, audit: bool) -> None:
    """Owners, disks (passwords shown as set/ALL/none, never more) and grants."""
    d = _open(ctx)
    if audit:
        for e in d.audit_log():
            when = datetime.datetime.fromtimestamp(e.at).isoformat(timespec="seconds")
            click.echo(f"{when} {printable(e.who)} {printable(e.action)} "
                       f"{printable(e.disk) or '-'} {printable(e.mode) or '-'} "
                       f"{printable(e.outcome)}: {printable(e.why)}")
        return
    for owner, principal in d.owners().items():
        click.echo(f"owner {owner} {printable(principal)}")
    for disk in d.disks():
        shown = {kind.value: ("none" if stored is None else "ALL" if stored == EVERYONE
                              else "set")
                 for kind, stored in disk.passwords.items()}
        click.echo(f"disk {disk.name} {printable(disk.server)} {printable(disk.key)} "
                   f"read={shown['read']} write={shown['write']} multi={shown['multi']}")
    for principal, disk_name, mode in d.grants():
        click.echo(f"grant {printable(principal)} {disk_name} {mode}")


@click.command()
@server_option
@click.argument("disk")
@click.argument("mountpoint", required=False)
@click.option("--mode", default="R", show_default=True,
              help="z/VM link mode: R RR SR ER W WR SW EW M MR MW SM.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
              help="The disk's password for this mode's class, if you have no grant.")
@click.option("--no-attach", is_flag=True,
              help="Only hold the link (print the NBD URI) for a client of your own.")
@click.option("--tls-certificates", metavar="DIR", envvar=TLS_ENV,
              help="Client certificate directory (default: $MINIDISK_TLS_CERTIFICATES, as "
              "for control commands): TLS for the link and for the disk's data.")
def link(server: str | None, disk: str, mountpoint: str | None, mode: str,
         password_file: str | None, no_attach: bool, tls_certificates: str | None) -> None:
    """Link DISK (owner.disk), attach it and, given MOUNTPOINT, mount it (ro for read links).

    The link lasts until `minidisk unlink`; a keeper process holds it (see minidisk.link).
    """
    if no_attach and mountpoint is not None:
        fail("--no-attach and a MOUNTPOINT exclude each other", code=2)
    password = _first_line(password_file) if password_file is not None else None
    try:
        parse_link_mode(mode)
        state = linker.link(disk, require_server(server), mountpoint=mountpoint, mode=mode,
                            password=password, tls_certificates=tls_certificates,
                            attach=not no_attach)
    except (ValueError, linker.LinkError) as e:
        fail(str(e))
    click.echo(state.summary())
    if no_attach:
        click.echo(linker.nbd_uri(state.server, state.export, tls_certificates))


@click.command()
@click.argument("target", required=False)
@click.option("--idle", is_flag=True,
              help="Instead of TARGET: unlink every link made for the stock automount's "
                   "program map whose device is no longer mounted (run it from a timer: "
                   "that daemon cannot tell us when it unmounts).")
@click.option("--min-age", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="SECONDS", help="With --idle: leave links younger than this alone "
              "(the automounter mounts after the map program returns).")
def unlink(target: str | None, idle: bool, min_age: float) -> None:
    """Unmount, detach and unlink TARGET (owner.disk or its mount point), in that order."""
    if idle == (target is not None):
        fail("give TARGET or --idle, not both and not neither", code=2)
    if idle:
        ended, problems = linker.unlink_idle(min_age)
        for state in ended:
            click.echo(f"{state.disk} unlinked (idle)")
        if problems:
            fail("; ".join(problems))
        return
    assert target is not None
    try:
        state = linker.unlink(target)
    except linker.LinkError as e:
        fail(str(e))
    click.echo(f"{state.disk} unlinked")


def register(cli: click.Group) -> None:
    cli.add_command(directory)
    cli.add_command(link)
    cli.add_command(unlink)
