"""The host-file namespace: keys → devices (rump_etfs), drivespecs (rump_server), partitions.

The daemon builds one `Namespace`, sizes its block-cache budget with `parse_size(-r)`, fills it
with `apply_all(drivespecs, ns)` and `register_device` (memory disks, dm mapped devices); the
NBD server calls `export_names` and `open_export`; dm tables `hold` the keys they map.
"""

from minidisk.namespace.blockcache import DEFAULT_CACHE_LIMIT, CacheMemory
from minidisk.namespace.drivespec import (
    Applied,
    Drivespec,
    DrivespecError,
    apply,
    apply_all,
    parse,
    parse_all,
)
from minidisk.namespace.keys import RUMP_ETFS_SIZE_ENDOFF, EtfsType, canonical_key
from minidisk.namespace.registry import (
    Namespace,
    NamespaceRow,
    OpenedExport,
    Reference,
)
from minidisk.namespace.sizes import SizeError, format_size, parse_size

__all__ = [
    "DEFAULT_CACHE_LIMIT",
    "RUMP_ETFS_SIZE_ENDOFF",
    "Applied",
    "CacheMemory",
    "Drivespec",
    "DrivespecError",
    "EtfsType",
    "Namespace",
    "NamespaceRow",
    "OpenedExport",
    "Reference",
    "SizeError",
    "apply",
    "apply_all",
    "canonical_key",
    "format_size",
    "parse",
    "parse_all",
    "parse_size",
]
