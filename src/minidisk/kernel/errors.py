"""Errors of kernel attach and the mount helpers; each message is meant for a user's terminal."""

from __future__ import annotations

from collections.abc import Sequence


class KernelError(Exception):
    """Base class: anything in minidisk.kernel that a caller may want to report and go on."""


class BadUriError(KernelError, ValueError):
    """An NBD URI that libnbd's syntax (and so nbdfuse and our kernel client) would reject."""


class AttachError(KernelError):
    """Bringing an export online failed; whatever was set up has been undone again."""


class DetachError(KernelError):
    """Taking an attachment down failed at one step; the state is kept so a retry can finish."""


class NotAttachedError(DetachError):
    """The device is not one that minidisk attached (or it was detached already)."""


class CommandError(KernelError):
    """An external tool (losetup, mkfs, mount, …) exited with an error."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        detail = output.strip().splitlines()
        last = detail[-1] if detail else "no output"
        super().__init__(f"{self.argv[0]} failed (exit {returncode}): {last}")
