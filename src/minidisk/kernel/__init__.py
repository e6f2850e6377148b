"""Kernel attach: NBD exports as kernel block devices, and file-system helpers for them.

`attach(uri)` → an Attachment whose `.device` is e.g. /dev/loop3 or /dev/nbd0;
`detach(device)` undoes it. See attach.py for the backends, state.py for the state directory.
"""

from minidisk.kernel.attach import METHODS, attach, detach
from minidisk.kernel.errors import (
    AttachError,
    BadUriError,
    CommandError,
    DetachError,
    KernelError,
    NotAttachedError,
)
from minidisk.kernel.state import Attachment, attachments
from minidisk.kernel.uri import parse_nbd_uri

__all__ = [
    "METHODS",
    "AttachError",
    "Attachment",
    "BadUriError",
    "CommandError",
    "DetachError",
    "KernelError",
    "NotAttachedError",
    "attach",
    "attachments",
    "detach",
    "parse_nbd_uri",
]
