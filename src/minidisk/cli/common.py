"""Helpers every command module shares: finding the server, failing with one line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"minidisk: {message}", err=True)
    sys.exit(code)


def server_option(func: F) -> F:
    """`--server URL`, defaulting to $MINIDISK_SERVER (as rump clients use RUMP_SERVER)."""
    return click.option("--server", "server", metavar="URL", envvar="MINIDISK_SERVER",
                        help="Server URL (default: $MINIDISK_SERVER).")(func)


def require_server(server: str | None, url: str | None = None) -> str:
    chosen = url or server
    if not chosen:
        fail("no server: give a URL or --server URL, or set MINIDISK_SERVER", code=2)
    return chosen
