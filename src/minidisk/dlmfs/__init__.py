"""dlmfs: the lock manager as a file system (FUSE, pyfuse3 on trio), with OCFS2 dlmfs's
semantics so that shell scripts and libo2dlm-style programs can lock with open/read/write/close.

======================  =========================================================================
operation               meaning here
======================  =========================================================================
mkdir /dlm/D            join domain D; only in the root (else EPERM); name < 64 bytes (EINVAL)
rmdir /dlm/D            leave D; ENOTEMPTY while lock files exist
open(D/L, O_CREAT)      create resource L; name < 32 bytes, no leading "$" (EINVAL); EACCES in
                        the root; without O_CREAT, ENOENT unless created through this mount
open O_RDONLY           PR lock; open O_WRONLY or O_RDWR: EX lock. Blocks until granted (with
                        --wait-limit at most that long, then ETIMEDOUT); EINTR if a signal
                        came meanwhile (once granted, as dlmfs)
+ O_NONBLOCK            trylock: ETXTBSY when not grantable at once (never queued)
read                    the 64-byte value block; 0 bytes when it is invalid (a PW/EX holder died)
                        or at offset >= 64
write                   needs EX (EBADF on a read-only descriptor); lands at the value block's
                        start whatever the position (ENOSPC at a position >= 64, truncated to
                        64 - position; O_APPEND ignored); stored when the lock leaves EX.
                        Page cache bypassed (direct_io)
fsync, fdatasync        EINVAL
poll                    POLLIN|POLLRDNORM when another node waits for the lock
close                   the open file description's hold ends at its last close (FUSE RELEASE);
                        the lock stays cached on this node until another node asks for it
unlink D/L              forget the resource, 8 s later (o2dlm's purge of an unused resource:
                        made again before that, it keeps its value block); EBUSY while this
                        mount holds it open
chmod, chown, truncate  local only; the size stays 64
mknod                   S_IFREG creates a lock file (it is how an O_CREAT open creates one);
                        other types EPERM, as symlink, link and rename
any name > 255 bytes    ENAMETOOLONG (before the name rules above)
======================  =========================================================================

A mount is a node (`fs.Resource`): one lock per lock file, cached; opens on the same mount,
from any process, are granted from it (PR beside PR, PR upconverted to EX beside PR holders)
and a close only counts its holder out. Another node's trylock fails while the lock is cached;
its blocking request makes this node give way once no local holder conflicts (EX to nothing
for EX, to PR for PR). Mounted with allow_other and default_permissions: the mode bits apply.

Deliberate divergences from OCFS2's dlmfs (tests/vm/test_dlmfs_oracle.py lists them):

* statfs gives FUSE's f_type (the kernel fills it in), so libo2dlm refuses the mount.
* A never-written value block reads as 64 zero bytes (valid), as fs/dlm gives it.
* A 0-byte write at position 64 or past succeeds: FUSE never sends it to the daemon (dlmfs
  gives ENOSPC).
* A signal during a blocked open: as on dlmfs, the wait goes on until the node has the lock,
  then the open fails with EINTR (the lock stays cached, no holder) if the thread has a caught
  or fatal signal pending and unblocked (read from /proc/TID/status: FUSE's INTERRUPT does not
  reach pyfuse3; `signals`). dlmfs's ERESTARTSYS is restarted for a handler with SA_RESTART
  (glibc's signal()), ending granted; a FUSE daemon can only answer EINTR, so it fails here.
* --exclusive (ours): local opens exclude each other too; FUSE's RELEASE is asynchronous, so a
  trylock right after a close may still find the lock held.
* If the lock manager connection is lost, every lock of the mount is gone: reads and writes on
  open descriptors fail with EIO, poll reports POLLERR, new opens fail with ENOTCONN.
"""
