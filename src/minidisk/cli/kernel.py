"""`minidisk attach` and `minidisk detach`."""

from __future__ import annotations

import click

from minidisk import kernel


@click.command()
@click.argument("uri")
@click.option("--read-only", "-r", is_flag=True, help="Attach read-only.")
@click.option("--method", type=click.Choice(kernel.METHODS), default="auto", show_default=True,
              help="Kernel nbd (netlink, ioctl) or nbdfuse + loop; auto picks the best here.")
def attach(uri: str, read_only: bool, method: str) -> None:
    """Bring NBD export URI online as a kernel block device and print its path.

    URI is nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (libnbd syntax).
    """
    try:
        attachment = kernel.attach(uri, read_only=read_only, method=method)
    except kernel.KernelError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # e.g. not root: the state directory or /dev/loop-control
        raise click.ClickException(f"cannot attach: {e}") from None
    click.echo(attachment.device)


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
