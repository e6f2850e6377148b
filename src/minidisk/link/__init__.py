"""Authorized on-demand linking: VMLINK and z/VM LINK, for minidisk.

An administrator grants the right to use another owner's disk once; from then on the user
never needs the administrator again — `minidisk link owner.disk`, or just entering
`/vmlink/owner.disk`, links the disk, brings it online and mounts it.

Modules:
    names      keys `owner.disk[.partition]` (validated, normalised) and principals
    modes      z/VM link modes, password classes, the test/held DLM mapping (§2.3)
    directory  the SQLite directory: owners, disks, scrypt passwords, grants, audit log
    authority  server side: resolve/link/unlink control commands, locks, export policy
    keeper     the process that holds one link (its control connection) alive
    linker     client side: link → attach → mount, and unmount → detach → unlink
    autofs     the kernel's autofs v5 protocol (packets, READY/FAIL, expire, catatonic)
    automount  the /vmlink daemon built on it, and the --program-map entry printer

How a link lives (the liveness design):

* The server that holds the disk is the authority. `minidisk serve` with a `directory` in its
  configuration checks each `link` request (owner → always; a grant covering the mode's
  password class; else the disk's read/write/multi password, `ALL`, or refusal), then takes
  the lock on its own lock-manager connection — one per link, named `vmlink MODE PRINCIPAL` —
  with a NOQUEUE request in the mode's test mode, down-converted to the held mode (WR/MR fall
  back to a CR read link, "FORCED R/O"). LINK never waits; a refusal names the link in the
  way (`linked W by uid:0`). Every link, unlink and refusal is appended to the audit log.
* A link is bound to the control connection that asked for it. `minidisk link` starts a
  keeper process (its own session) that makes that connection, reports the answer on a pipe
  and then just holds the connection open. When the connection closes — `minidisk unlink`
  SIGTERMs the keeper, which says `unlink` first; kill -9; a crash; a lost network — the
  server ends the link: releases the lock, hangs up that principal's data connections to the
  disk, audits the unlink with the reason. If the daemon itself dies, its lock-manager
  connections die with it and so do the locks.
* The export policy admits a principal (SO_PEERCRED uid on the unix socket, verified TLS
  subject on TCP) to a governed export only while it holds a live link: READ_ONLY for read
  links and degraded ones (writes fail EPERM at the server), READ_WRITE for write links;
  the owner always. Raw NBD clients without a link get ERR_POLICY and an empty LIST.
* On the client, attach and mount run in the `link` command itself (nbdfuse + loop outlive
  it as usual); state under $MINIDISK_STATE_DIR/link lets `unlink` undo it in order —
  umount, detach, stop the keeper — resumably after a halfway failure.

Divergences from z/VM: one live link per (principal, disk) on a server (a second is EEXIST,
where CP would let a user link its own disk twice); the owner's logon link is not implicit —
the owner's access is unconditional, and counts against others only when it links; SW's
admission rule is IBM's unverified wording; ER holds EX but the data path is read-only.
"""
