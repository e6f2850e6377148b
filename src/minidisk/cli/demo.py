"""What the two quickstart commands share: step messages, waiting, stopping their server."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click

from minidisk import control_client


def step(message: str) -> None:
    click.echo(click.style("==> ", fg="green", bold=True) + message)


def wait_for_ctrl_c(message: str) -> None:
    """Print `message` and wait for Ctrl-C (SIGINT) or SIGTERM. The signals are blocked
    before the message appears and taken with sigwait, so one sent the moment the message is
    read (by a script, or a quick hand) ends the wait instead of cutting the teardown short."""
    waited = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        step(message)
        signal.sigwait(waited)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def halt_server(url: str, sock: Path) -> None:
    """Stop the demo's server; `halt` returns before its socket is gone, so wait for that."""
    step(f"halting the server at {url}")
    try:
        control_client.call(url, "halt", {"force": True})  # its own server, its disks gone
    except control_client.ControlError as e:
        click.echo(f"    halt failed: {e}", err=True)
    for _ in range(100):
        if not sock.exists():
            break
        time.sleep(0.05)
