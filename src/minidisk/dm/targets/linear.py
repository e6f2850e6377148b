"""`linear <dev> <offset>`: a window of one device (DOC/linear.rst).

The hot path of LVM-style layouts: each operation is one addition and one await (the
forwarding in `WindowTarget`).
"""

from __future__ import annotations

from minidisk.dm.status_table import LinearTable
from minidisk.dm.target import TargetContext, TargetError, WindowTarget


class Linear(WindowTarget):
    name = "linear"
    version = (1, 4, 0)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) != 2:
            raise TargetError("Invalid argument count: expected <dev> <offset>")
        self.open_window(ctx, args[0], args[1])

    def status_table(self) -> LinearTable:
        return LinearTable(self.ref.key, self.start)
