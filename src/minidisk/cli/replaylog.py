"""`minidisk replay-log`: replay a log-writes log onto a host file (xfstests' replay-log)."""

from __future__ import annotations

import asyncio

import click


@click.command(name="replay-log")
@click.option("--log", "log_path", required=True, metavar="FILE", help="The log device/file.")
@click.option("--replay", "replay_path", metavar="FILE", help="Device/file to replay onto.")
@click.option("--limit", type=click.IntRange(min=0), help="Replay the first N entries.")
@click.option("--end-mark", metavar="MARK", help="Replay up to and including MARK.")
@click.option("--start-entry", type=click.IntRange(min=0), default=0,
              help="Skip entries before this one.")
@click.option("--find", is_flag=True, help="Print the entry number of --end-mark.")
@click.option("--num-entries", is_flag=True, help="Print the number of entries.")
@click.option("-v", "--verbose", is_flag=True, help="List entries as they are replayed.")
def replay_log(log_path: str, replay_path: str | None, limit: int | None,
               end_mark: str | None, start_entry: int, find: bool, num_entries: bool,
               verbose: bool) -> None:
    """Replay a log-writes log onto a device, up to an entry or a mark (xfstests style)."""
    from minidisk.device.file import FileDevice
    from minidisk.dm import writelog

    async def run() -> None:
        log = FileDevice(log_path, read_only=True)
        try:
            if num_entries:
                click.echo((await writelog.read_super(log)).nr_entries)
                return
            if find:
                if end_mark is None:
                    raise click.UsageError("--find needs --end-mark")
                index = await writelog.find_mark(log, end_mark)
                if index is None:
                    raise click.ClickException(f"mark {end_mark!r} not found")
                click.echo(index)
                return
            if replay_path is None:
                raise click.UsageError("--replay is required to replay")
            if verbose:
                async for entry in writelog.entries(log):
                    click.echo(entry.describe())
            target = FileDevice(replay_path)
            try:
                await writelog.replay(log, target, limit=limit, end_mark=end_mark,
                                      start_entry=start_entry)
                await target.flush()
            finally:
                await target.close()
        finally:
            await log.close()

    try:
        asyncio.run(run())
    except OSError as e:
        raise click.ClickException(e.strerror or str(e)) from None


def register(cli: click.Group) -> None:
    cli.add_command(replay_log)
