"""minidisk: userspace block storage for Linux.

The public entry points for a user who wants a Python object served as a block device::

    from minidisk import serve_object
    serve_object(MyDisk(), "unix:///tmp/disk.sock")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minidisk.device import BlockDevice, BlockSize, Caps, Extent, from_object
    from minidisk.nbd.server import serve_object

__all__ = ["BlockDevice", "BlockSize", "Caps", "Extent", "from_object", "serve_object"]

# Loaded on first use: every `minidisk.x` import runs this file, and the server's modules
# (asyncio, ssl, ctypes…) cost seconds of Python in a TCG guest, where `minidisk detach` runs.
_HOMES = {"BlockDevice": "minidisk.device", "BlockSize": "minidisk.device",
          "Caps": "minidisk.device", "Extent": "minidisk.device",
          "from_object": "minidisk.device", "serve_object": "minidisk.nbd.server"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'minidisk' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
