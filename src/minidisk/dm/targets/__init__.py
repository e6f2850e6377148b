"""The target types a table may name, one module each."""

from __future__ import annotations

from minidisk.dm.target import Target
from minidisk.dm.targets.crypt import Crypt
from minidisk.dm.targets.delay import Delay
from minidisk.dm.targets.dust import Dust
from minidisk.dm.targets.error import Error
from minidisk.dm.targets.flakey import Flakey
from minidisk.dm.targets.integrity import Integrity
from minidisk.dm.targets.linear import Linear
from minidisk.dm.targets.log_writes import LogWrites
from minidisk.dm.targets.snapshot import Snapshot, SnapshotMerge
from minidisk.dm.targets.snapshot_origin import SnapshotOrigin
from minidisk.dm.targets.striped import Striped
from minidisk.dm.targets.thin import Thin
from minidisk.dm.targets.thin_pool import ThinPool
from minidisk.dm.targets.zero import Zero

# In the order 6.1 lists them (`dmsetup targets`: most recently registered first, dm-mod's
# own striped, linear and error last) once dm-integrity, dm-crypt, dm-thin-pool (thin, then
# thin-pool), dm-snapshot (snapshot, snapshot-origin, snapshot-merge), dm-zero, dm-delay,
# dm-flakey and dm-log-writes are loaded in that order (tests/vm/guest/dmsetup_kernel.sh
# loads them so); dust, which 6.1 is built without, as if loaded last.
TARGET_TYPES: dict[str, type[Target]] = {
    t.name: t for t in (Dust, LogWrites, Flakey, Delay, Zero, SnapshotMerge, SnapshotOrigin,
                        Snapshot, ThinPool, Thin, Crypt, Integrity, Striped, Linear, Error)
}

__all__ = ["TARGET_TYPES"]
