"""The `minidisk` command: a click group that gathers the command modules."""

from __future__ import annotations

import logging
import os

import click

from minidisk.cli import automount, dlm, dmsetup, kernel, link, quickstart, serve, vmlink_demo


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
def cli(verbose: int) -> None:
    """Userspace block storage for Linux."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="minidisk[%(process)d] %(levelname)s %(name)s: %(message)s")


for module in (serve, kernel, dlm, dmsetup, quickstart, link, automount, vmlink_demo):
    module.register(cli)


def main() -> None:
    cli(prog_name="minidisk", auto_envvar_prefix=None,
        obj={"server": os.environ.get("MINIDISK_SERVER")})
