"""A 128 MiB memory disk written the BUSE way: a plain class, served over NBD.

The equivalent of BUSE's busexmp.c, in a dozen lines of user code::

    python -m minidisk.examples.ramdisk [unix:///tmp/ramdisk.sock]

then, for example, ``nbdinfo 'nbd+unix:///ramdisk?socket=/tmp/ramdisk.sock'`` or
``minidisk attach 'nbd+unix:///ramdisk?socket=/tmp/ramdisk.sock'``. Because the class has
flush and trim, the server advertises them; because it says it never blocks, its methods
run inline on the event loop instead of in the thread pool.
"""

from __future__ import annotations

import sys

from minidisk.nbd.server import serve_object


class RamDisk:
    blocking = False  # pure memory: never sleeps, so no thread pool is needed

    def __init__(self, size: int = 128 * 1024 * 1024) -> None:
        self.size = size
        self.data = bytearray(size)

    def read(self, offset: int, length: int) -> memoryview:
        return memoryview(self.data)[offset:offset + length]

    def write(self, offset: int, data: memoryview) -> None:
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass  # nothing is cached between the client and this bytearray

    def trim(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "unix:///tmp/ramdisk.sock"
    print(f"serving a 128 MiB ramdisk as export 'ramdisk' at {url}", file=sys.stderr)
    serve_object(RamDisk(), url, name="ramdisk")


if __name__ == "__main__":
    main()
