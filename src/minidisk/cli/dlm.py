"""`minidisk dlm serve|status|purge` and `minidisk dlmfs MOUNTPOINT`.

The lock manager's URL comes from `--server`, else $MINIDISK_DLM, else
unix:///run/minidisk/dlm.sock (`unix:///abs/path`, `unix://relative/path` or a bare path).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from minidisk.cli.common import FOREGROUND_HELP, LOG_FILE_HELP, fail, run_as_daemon
from minidisk.dlm.limits import Limits

SERVER_HELP = "Lock manager URL (default: $MINIDISK_DLM or unix:///run/minidisk/dlm.sock)."


def register(cli: click.Group) -> None:
    cli.add_command(dlm)
    cli.add_command(dlmfs)


@click.group()
def dlm() -> None:
    """The lock manager (VMS/Linux DLM semantics)."""


@dlm.command()
@click.argument("url", required=False)
@click.option("-f", "--foreground", is_flag=True, help=FOREGROUND_HELP)
@click.option("--log-file", metavar="FILE", help=LOG_FILE_HELP)
@click.option("--busy-poll-us", type=click.IntRange(0, 10_000), metavar="US",
              help="Keep polling this long after each request before sleeping (default: "
                   "$MINIDISK_DLM_BUSY_POLL_US, else 100; 0 = off).")
@click.option("--max-clients", type=click.IntRange(1), default=Limits.clients,
              show_default=True, help="Connections served at once (more are refused).")
@click.option("--max-prompt-clients", type=click.IntRange(0), default=Limits.prompt_clients,
              show_default=True,
              help="Connections granted prompt-unlock at once (each costs every request of "
                   "the others a look at its socket); more get the feature refused.")
@click.option("--max-locks-per-client", type=click.IntRange(1),
              default=Limits.locks_per_client, show_default=True,
              help="Locks one connection may have, granted or queued.")
@click.option("--max-domains-per-client", type=click.IntRange(1),
              default=Limits.domains_per_client, show_default=True,
              help="Domains one connection may be a member of.")
@click.option("--max-locks", type=click.IntRange(1), default=Limits.locks, show_default=True,
              help="Locks of all clients together.")
@click.option("--max-resources", type=click.IntRange(1), default=Limits.resources,
              show_default=True,
              help="Resources, lock-free ones (which keep a value block) included.")
def serve(url: str | None, foreground: bool, log_file: str | None, busy_poll_us: int | None,
          max_clients: int, max_prompt_clients: int, max_locks_per_client: int,
          max_domains_per_client: int, max_locks: int, max_resources: int) -> None:
    """Run a lock manager on URL until SIGINT/SIGTERM; it detaches once it listens ("listening
    on PATH"), unless -f. A client asking for more than the limits allow gets an error
    (ENOLCK, EDQUOT, ENOSPC, EUSERS)."""
    from minidisk.dlm.service import run_dlm_service

    limits = Limits(clients=max_clients, prompt_clients=max_prompt_clients,
                    locks_per_client=max_locks_per_client,
                    domains_per_client=max_domains_per_client, locks=max_locks,
                    resources=max_resources)
    busy_poll = None if busy_poll_us is None else busy_poll_us / 1e6
    run_as_daemon("minidisk dlm serve", foreground, log_file, lambda ready: run_dlm_service(
        url, ready=lambda path: ready(f"listening on {path}"), limits=limits,
        busy_poll=busy_poll))


def _with_client(url: str | None, work: Any) -> Any:
    import anyio

    from minidisk.dlm.client import NoLockManagerError, connect

    async def main() -> Any:
        async with connect(url, name="minidisk-cli") as client:
            return await work(client)

    try:
        return anyio.run(main)
    except NoLockManagerError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(f"lock manager: {err}") from None


@dlm.command()
@click.option("--server", "url", help=SERVER_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the raw snapshot as JSON.")
def status(url: str | None, as_json: bool) -> None:
    """Domains, resources, holders, waiters, modes and fencing tokens."""
    snapshot = _with_client(url, lambda client: client.status())
    if as_json:
        click.echo(json.dumps(snapshot, indent=2))
        return
    for line in format_status(snapshot):
        click.echo(line)


def format_status(snapshot: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for domain in snapshot["domains"]:
        lines.append(f"domain {domain['name']}  members: {', '.join(domain['members']) or '-'}")
        for res in domain["resources"]:
            lvb = res["lvb"]
            state = f"seq {lvb['seq']}" if lvb["valid"] else f"INVALID (seq {lvb['seq']})"
            lines.append(f"  resource {res['name']}  lvb {state}")
            for queue in ("granted", "converting", "waiting"):
                for lk in res[queue]:
                    modes = lk["grmode"] or "-"
                    if lk["rqmode"]:
                        modes = f"{modes}->{lk['rqmode']}" if lk["grmode"] else lk["rqmode"]
                    owner = lk["owner"] or f"ORPHAN of {lk['orphan_of']}"
                    extra = " persistent" if lk["persistent"] else ""
                    token = f"token {lk['token']}" if queue != "waiting" else ""
                    lines.append(f"    {queue:<10} {modes:<7} {owner:<24} "
                                 f"lkid {lk['lkid']:<6} {token}{extra}".rstrip())
    clients = snapshot.get("clients", [])
    lines.append(f"clients: {len(clients)}")
    for client in clients:
        lines.append(f"  {client['owner']:<24} locks {client['locks']}")
    return lines


CONFLICT_EXIT = 1  # flock(1)'s status when the lock is not granted (-E changes it)


@dlm.command(context_settings={"ignore_unknown_options": True})
@click.option("--server", "url", help=SERVER_HELP)
@click.option("-m", "--mode", default="EX", show_default=True,
              help="Lock mode: NL CR CW PR PW EX.")
@click.option("-n", "--nonblock", is_flag=True,
              help="Fail at once instead of waiting when the lock is not grantable.")
@click.option("-w", "--timeout", type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS", help="Fail after waiting this long.")
@click.option("-E", "--conflict-exit-code", type=click.IntRange(0, 255),
              default=CONFLICT_EXIT, show_default=True,
              help="Exit status when the lock is not granted.")
@click.argument("domain")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lock(url: str | None, mode: str, nonblock: bool, timeout: float | None,
         conflict_exit_code: int, domain: str, name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND while holding lock NAME in DOMAIN, as flock(1) does with a file.

    A wait longer than a second shows its progress (on stderr). COMMAND gets the lock's
    fencing token in $MINIDISK_LOCK_TOKEN; the exit status is COMMAND's, or
    --conflict-exit-code when the lock was not granted.
    """
    import os
    import subprocess

    import anyio

    from minidisk.cli.progress import Progress
    from minidisk.dlm import Mode

    try:
        wanted = Mode.parse(mode)
    except (KeyError, ValueError):
        fail(f"--mode {mode!r}: expected one of {' '.join(m.name for m in Mode)}", code=2)

    async def hold(client: Any) -> int | None:
        handle = client.lock(domain, name, wanted)
        with Progress(f"waiting for {wanted.name} on {domain}/{name}"):
            granted = await handle.acquire(blocking=not nonblock, timeout=timeout)
        if not granted:
            return None
        client.on_lost = lambda: click.echo(
            f"minidisk: {domain}/{name}: lost the lock manager: the lock is gone", err=True)
        env = {**os.environ, "MINIDISK_LOCK_TOKEN": str(handle.token)}
        try:
            return int(await anyio.to_thread.run_sync(
                lambda: subprocess.call(list(command), env=env)))
        except OSError as err:
            click.echo(f"minidisk: {command[0]}: {err.strerror}", err=True)
            return 127 if isinstance(err, FileNotFoundError) else 126
        finally:
            if not client.closed:  # a lost connection took the lock with it
                await handle.release()

    status = _with_client(url, hold)
    if status is None:
        why = ("not grantable now" if nonblock or timeout is None
               else f"not granted within {timeout:g} s")
        fail(f"{domain}/{name}: {wanted.name} {why}", code=conflict_exit_code)
    sys.exit(status if status >= 0 else 128 - status)


@dlm.command()
@click.option("--server", "url", help=SERVER_HELP)
@click.option("--domain", help="Only orphans in this domain.")
@click.option("--pid", type=int, help="Only orphans left by this (dead) process.")
def purge(url: str | None, domain: str | None, pid: int | None) -> None:
    """Remove orphans: PERSISTENT locks whose owner died."""
    count = _with_client(url, lambda client: client.purge(domain, pid))
    click.echo(f"purged {count} orphan lock{'s' if count != 1 else ''}")


@click.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--server", "url", help=SERVER_HELP)
@click.option("--wait-limit", type=float, default=None,
              help="Longest a blocking open waits for its lock before failing with "
                   "ETIMEDOUT (default: until granted, as dlmfs; a process blocked in a FUSE "
                   "open cannot be killed meanwhile).")
@click.option("--exclusive", is_flag=True,
              help="Local opens exclude each other as opens on other nodes do (an extension: "
                   "dlmfs leaves local exclusion to the programs).")
@click.option("--debug-fuse", is_flag=True, help="Log every FUSE request.")
@click.option("-f", "--foreground", is_flag=True, help=FOREGROUND_HELP)
@click.option("--log-file", metavar="FILE", help=LOG_FILE_HELP)
def dlmfs(mountpoint: str, url: str | None, wait_limit: float | None, exclusive: bool,
          debug_fuse: bool, foreground: bool, log_file: str | None) -> None:
    """Mount the lock file system (OCFS2 dlmfs semantics) on MOUNTPOINT; it detaches once
    mounted, unless -f.

    It returns as `mount` does, once the mount is there. Unmount with `fusermount3 -u
    MOUNTPOINT` (or SIGINT/SIGTERM)."""
    from minidisk.dlmfs.mount import run_dlmfs

    run_as_daemon("minidisk dlmfs", foreground, log_file, lambda ready: run_dlmfs(
        mountpoint, url, wait_limit=wait_limit, exclusive=exclusive, debug=debug_fuse,
        ready=lambda: ready("")))
