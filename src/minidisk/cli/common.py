"""Helpers every command module shares: finding the server, failing with one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
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


def printable(text: str) -> str:
    """Text that came from a peer (a disk name, a reason, a subject), printed so that it can
    never start a line of its own or rewrite the terminal: backslash escapes for control,
    format and separator characters, and for the backslash itself."""
    from minidisk.link.names import has_control_characters  # here: most commands never print one

    if not has_control_characters(text) and "\\" not in text:
        return text
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif has_control_characters(c):
            out.append(c.encode("unicode_escape").decode("ascii"))  # \n, \x1b, \u2028
        else:
            out.append(c)
    return "".join(out)


def echo_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows in columns two spaces apart, each column as wide as its widest cell; the last one
    unpadded (it may be long: a URI), as `losetup -a` lays its columns out."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        click.echo("  ".join([*cells, row[-1]]))


FOREGROUND_HELP = "Stay in the foreground (by default it detaches once ready, as `serve` does)."
LOG_FILE_HELP = "Where it logs once detached (default: syslog)."


def describe(err: BaseException) -> str:
    """One line for an error: an OSError's "[Errno N] ..." prefix left out."""
    if isinstance(err, OSError) and err.strerror and str(err).startswith("[Errno"):
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


def run_as_daemon(command: str, foreground: bool, log_file: str | None,
                  run: Callable[[Callable[[str], None]], None]) -> None:
    """Run `run(ready)` here (in the foreground: `ready` prints its line, if any), or detach
    first: the parent exits 0 once the child calls `ready`, else prints the child's one line
    and exits non-zero, as `minidisk serve` does."""
    if foreground:
        try:
            run(lambda line: print(line, flush=True) if line else None)
        except (OSError, ValueError) as err:
            fail(describe(err))
        return
    from minidisk.daemon.lifecycle import Readiness, detach

    def child(readiness: Readiness) -> int:
        try:
            run(lambda line: readiness.ready([line] if line else []))
        except (OSError, ValueError) as err:
            readiness.failed(describe(err))
            return 1
        except BaseException as err:  # the parent must hear of it, whatever it is
            readiness.failed(f"{type(err).__name__}: {err}")
            raise
        return 0

    sys.exit(detach(child, log_file, command))
