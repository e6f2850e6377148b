"""dm-thin's on-disk metadata (persistent-data): blocks, btrees, space maps, transactions.

`disk` has the byte layouts, `spacemap` the in-memory reference counts, `btree` the
transaction manager and copy-on-write btrees, `metadata` the pool's devices and mappings.
The targets that use it are dm/targets/thin_pool.py and thin.py.
"""
