"""`minidisk attach` and `minidisk detach`."""

from __future__ import annotations

import os

import click

from minidisk import kernel
from minidisk.cli.common import echo_table
from minidisk.kernel.defaults import DEFAULT_PERSIST_WAIT, DEFAULT_TIMEOUT, MAX_CONNECTIONS


@click.command()
@click.argument("uri", required=False)
@click.option("--read-only", "-r", is_flag=True, help="Attach read-only.")
@click.option("--method", type=click.Choice(kernel.METHODS), default="auto", show_default=True,
              help="Kernel nbd (netlink, ioctl) or nbdfuse + loop; auto picks the best here.")
@click.option("--connections", "-C", type=click.IntRange(1, MAX_CONNECTIONS),
              help="Kernel nbd: NBD connections, for a server that allows multi-conn "
                   "(as nbd-client -C; default 1).")
@click.option("--timeout", "-t", type=click.IntRange(0), metavar="SECONDS",
              help="Kernel nbd: a request the server leaves unanswered this long fails, with "
                   f"every later one (as nbd-client -t; 0 waits forever; default "
                   f"{DEFAULT_TIMEOUT}).")
@click.option("--persist", "-p", is_flag=True,
              help="Kernel nbd (netlink): when the server goes away, reconnect once it is back "
                   "(as nbd-client -persist); I/O waits for it meanwhile.")
@click.option("--persist-wait", type=click.IntRange(1), metavar="SECONDS",
              help="With --persist: how long I/O waits for the server to come back before it "
                   f"fails (default {DEFAULT_PERSIST_WAIT}).")
@click.option("--truncate", is_flag=True,
              help="Attach an export whose size is not a whole number of blocks without its "
                   "partial last block (refused otherwise: the kernel would cut it silently).")
@click.option("--list", "-l", "list_", is_flag=True,
              help="List what minidisk attached: device, method, helper pid, URI.")
def attach(uri: str | None, read_only: bool, method: str, connections: int | None,
           timeout: int | None, persist: bool, persist_wait: int | None, truncate: bool,
           list_: bool) -> None:
    """Bring NBD export URI online as a kernel block device and print its path.

    URI is nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (libnbd syntax).
    """
    if list_:
        if uri is not None:
            raise click.UsageError("give a URI or --list, not both")
        list_attachments()
        return
    if uri is None:
        raise click.UsageError("missing argument URI (or --list)")
    if persist_wait is not None and not persist:
        raise click.UsageError("--persist-wait goes with --persist")
    if os.geteuid() != 0:  # nbd, loop devices and their state directory are root's
        raise click.ClickException(f"attaching {uri} needs root: run it with sudo")
    try:
        attachment = kernel.attach(uri, read_only=read_only, method=method,
                                   connections=connections, timeout=timeout,
                                   persist_wait=(persist_wait or DEFAULT_PERSIST_WAIT)
                                   if persist else None, truncate=truncate)
    except kernel.KernelError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # e.g. not root: the state directory or /dev/loop-control
        raise click.ClickException(f"cannot attach: {e}") from None
    click.echo(attachment.device)


def list_attachments() -> None:
    """One line per attachment, as `losetup -a` lists loop devices; PID is the helper that
    serves the device (nbdfuse, the NBD_DO_IT process), "-" when the kernel holds it alone."""
    rows = [("DEVICE", "METHOD", "PID", "URI")]
    for a in kernel.attachments():
        rows.append((a.device, a.method, str(a.helpers[0].pid) if a.helpers else "-", a.uri))
    echo_table(rows)


@click.command()
@click.argument("device")
def detach(device: str) -> None:
    """Undo `minidisk attach` for DEVICE, such as /dev/loop3."""
    try:
        kernel.detach(device)
    except kernel.KernelError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot detach {device}: {e}") from None


def register(cli: click.Group) -> None:
    cli.add_command(attach)
    cli.add_command(detach)
