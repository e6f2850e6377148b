"""Captive mode (nbdkit's --run): serve while one shell command runs, then stop.

`minidisk serve --memory d=1G --run 'nbdcopy disk.img "$uri"'` is a server whose life is the
command's: the command starts once the server listens, finds it through the variables
nbdkit sets ($uri, $unixsocket or $port, $exportname; $sock is a short name for the socket),
and when it exits the server stops and exits with the command's status. Without a URL the
server listens on a socket in a private temporary directory, removed afterwards.

The command runs through /bin/sh -c with the caller's environment and these variables added;
it is the caller's own command, run with the caller's identity, so nothing here is a
privilege boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

STOP_GRACE_S = 10.0  # a command still running when the server stops gets this long after SIGTERM


def variables(uris: list[str], address: str | tuple[str, int] | None,
              export: str) -> dict[str, str]:
    """nbdkit's captive-mode variables for the first listener and the first export."""
    found = {"uri": uris[0] if uris else "", "exportname": export,
             "unixsocket": "", "sock": "", "port": ""}
    if isinstance(address, str):
        found["unixsocket"] = found["sock"] = address
    elif address is not None:
        found["port"] = str(address[1])
    return found


async def run_command(command: str, env: dict[str, str]) -> int:
    """Run `command` in /bin/sh with `env` added; its exit status (128 + N if killed by
    signal N, as a shell reports it). Cancelled, it sends the command SIGTERM and waits up to
    STOP_GRACE_S, then SIGKILL."""
    process = await asyncio.create_subprocess_exec("/bin/sh", "-c", command,
                                                   env={**os.environ, **env})
    try:
        status = await process.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        raise
    if status < 0:
        return 128 - status
    return status
