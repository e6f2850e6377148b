"""dlmfs: the lock manager as a file system (FUSE, pyfuse3 on trio), with OCFS2 dlmfs's
semantics so that shell scripts and libo2dlm-style programs can lock with open/read/write/close.

======================  =========================================================================
operation               meaning here
======================  =========================================================================
mkdir /dlm/D            join domain D; only in the root (else EPERM); name < 64 bytes (EINVAL)
rmdir /dlm/D            leave D; ENOTEMPTY while lock files exist
open(D/L, O_CREAT)      create resource L; name < 32 bytes, no leading "$" (EINVAL); EACCES in
                        the root; without O_CREAT, ENOENT unless created through this mount
open O_RDONLY           PR lock; open O_WRONLY or O_RDWR: EX lock. Blocks until granted, but at
                        most --wait-limit seconds, then fails with ETIMEDOUT (a process blocked
                        in a FUSE open cannot be interrupted or killed, so every wait is bounded)
+ O_NONBLOCK            trylock: ETXTBSY when not grantable at once (never queued)
read                    the 64-byte value block; 0 bytes when it is invalid (a PW/EX holder died)
                        or at offset >= 64
write                   needs EX (EBADF on a read-only descriptor); ENOSPC at offset >= 64,
                        longer writes truncated; stored at close. Page cache bypassed (direct_io)
poll                    POLLIN|POLLRDNORM when another holder waits for the lock
close                   drops the lock before close(2) returns (done in FUSE FLUSH: RELEASE is
                        asynchronous, so a trylock right after close could otherwise fail; the
                        unlock counts once written, as the mount's connection is prompt-unlock);
                        closing one of several descriptors of a description (dup2, fork) keeps
                        it: see `holders`
unlink D/L              forget the resource; EBUSY while this mount holds it open
chmod, chown, truncate  local only; the size stays 64
======================  =========================================================================

Deliberate divergences from OCFS2's dlmfs:

* Every open file description holds its own lock, so two processes on the same machine exclude
  each other (dlmfs only counts local holders and leaves local exclusion to the programs).
* FUSE cannot say which close is a description's last, so `holders` counts descriptors in
  the openers' process trees: a description passed to an unrelated process, or kept by a child
  that outlives its opener, loses its lock at the opener's last close (later reads and writes
  on it fail with EIO).
* O_APPEND is not cleared at open: an appending write starts at offset 64 and gets ENOSPC.
* A never-written value block reads as 64 zero bytes (valid), as fs/dlm gives it.
* If the lock manager connection is lost, every lock of the mount is gone: reads and writes on
  open descriptors fail with EIO, poll reports POLLERR, new opens fail with ENOTCONN.
"""
