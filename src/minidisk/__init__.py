"""minidisk: userspace block storage for Linux.

The public entry points for a user who wants a Python object served as a block device::

    from minidisk import serve_object
    serve_object(MyDisk(), "unix:///tmp/disk.sock")
"""

from minidisk.device import BlockDevice, BlockSize, Caps, Extent, from_object
from minidisk.nbd.server import serve_object

__all__ = ["BlockDevice", "BlockSize", "Caps", "Extent", "from_object", "serve_object"]
