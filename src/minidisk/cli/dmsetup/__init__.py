"""`minidisk dmsetup ...`: dmsetup's commands and output, against a running server.

Output formats are lvm2 dmsetup's (minidisk.dm.report, minidisk.dm.stats_report). One
module per kind of command: base (the group, the invocation, failures), lifecycle (making
and changing devices), listing (reports about them), stats (dmsetup stats), usage (texts).
"""

from __future__ import annotations

import click

from minidisk.cli.dmsetup import lifecycle, listing, stats  # noqa: F401  (they register)
from minidisk.cli.dmsetup.base import dmsetup


def register(cli: click.Group) -> None:
    cli.add_command(dmsetup)


__all__ = ["dmsetup", "register"]
