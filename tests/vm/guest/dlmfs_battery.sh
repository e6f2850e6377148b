# The dlmfs observation battery: what a program written for OCFS2's dlmfs sees, step by step,
# from the shell alone, on two mounts that are two lock owners ("nodes").
# Usage: bash dlmfs_battery.sh MOUNT_A MOUNT_B OUTDIR
# Each `obs NAME CMD...` leaves OUTDIR/NAME: "rc=STATUS out=STDOUT err=STRERROR" (the error
# text without the tool's prefix and paths). It runs unchanged against the kernel's
# ocfs2_dlmfs in a guest (guest/dlmfs_o2cb.sh) and against minidisk's dlmfs on the host;
# tests/vm/test_dlmfs_oracle.py compares the two directories file by file.
#
# Shell tools only (Python in a TCG guest starts in seconds): `exec N<` holds a PR lock and
# `exec N>` an EX lock in this shell until `exec N>&-`; dd's iflag/oflag=nonblock open with
# O_NONBLOCK, dlmfs's trylock (ETXTBSY when not grantable); a blocking open in the background
# writes a marker once granted. Waits are few and short: each costs the guest real seconds.
set -u
umask 022
A=$1 B=$2 OUT=$3
T=$(mktemp -d /tmp/dlmfs-battery.XXXXXX)
mkdir -p "$OUT"

# obs NAME CMD...: run CMD (a function or a tool); record its status, stdout (lines joined
# by spaces) and the strerror part of each stderr line (after the last ": ", so tool prefixes
# and paths drop out). Builtins only around CMD: every exec costs a TCG guest a good part of
# a second.
obs() {
  local name=$1 rc out err
  shift
  "$@" > "$T/out" 2> "$T/err"
  rc=$?
  mapfile -t out < "$T/out"
  mapfile -t err < "$T/err"
  err=("${err[@]##*: }")
  printf 'rc=%s out=%s err=%s\n' "$rc" "${out[*]}" "${err[*]}" > "$OUT/$name"
}

rep() { local s; printf -v s '%*s' "$2" ''; printf '%s' "${s// /$1}"; }  # rep CHAR COUNT
create() { : > "$1"; }                                  # O_WRONLY|O_CREAT|O_TRUNC: EX
write() { printf '%s' "$2" > "$1"; }
append() { printf '%s' "$2" >> "$1"; }
tryr() { dd if="$1" iflag=nonblock count=0 status=none; }       # PR trylock
tryw() { dd if=/dev/null of="$1" oflag=nonblock conv=notrunc,nocreat status=none; }  # EX
tryc() { dd if=/dev/null of="$1" oflag=nonblock conv=notrunc status=none; }  # O_CREAT too
# lvb FILE: the value block as a PR open reads it: its text without NULs, and its length.
lvb() {
  local parts size
  mapfile -t -d '' parts < "$1" || return
  size=$(wc -c < "$1") || return
  local IFS=
  printf '%s %s' "${parts[*]}" "$size"
}
# waiter NAME MODE FILE: a blocking open (< PR, > EX) in the background; $T/NAME is written
# once it is granted. It closes the lock descriptors it inherited from this shell: keeping
# them would make it hold the very lock it waits for (a deadlock, on the kernel's dlmfs too).
waiter() {
  if [ "$2" = "<" ]; then
    ( exec 5>&- 6>&- 7>&- && exec 8< "$3" && echo granted > "$T/$1" ) 2> /dev/null &
  else
    ( exec 5>&- 6>&- 7>&- && exec 8> "$3" && echo granted > "$T/$1" ) 2> /dev/null &
  fi
}
granted() { if [ -e "$T/$1" ]; then echo granted; else echo waiting; fi; }
# settle NAME...: wait (at most 20 s) until every waiter named has been granted.
settle() {
  local i name
  for i in $(seq 100); do
    for name; do [ -e "$T/$name" ] || { sleep 0.2; continue 2; }; done
    return
  done
}
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }

# -- domains -----------------------------------------------------------------------------
obs d.mkdir mkdir "$A/dom"
obs d.mkdir_again mkdir "$A/dom"
obs d.mkdir_b mkdir "$B/dom"
obs d.mkdir_nested mkdir "$A/dom/sub"
obs d.name64 mkdir "$A/$(rep d 64)"
obs d.name256 mkdir "$A/$(rep d 256)"
obs d.create_in_root create "$A/inroot"
obs d.fifo_in_root mknod "$A/fifo" p
obs d.ls_root ls -a "$A"
obs d.stat_root stat -c '%F %a %h' "$A"
obs d.stat_dom stat -c '%F %a %h %s' "$A/dom"
obs d.statfs_type stat -f -c %t "$A"
obs d.statfs_namemax stat -f -c %l "$A"
obs d.nobody_mkdir as_nobody mkdir "$A/udom"

# -- lock names and inodes ---------------------------------------------------------------
obs n.len31 create "$A/dom/$(rep x 31)"
obs n.len32 create "$A/dom/$(rep x 32)"
obs n.len256 create "$A/dom/$(rep x 256)"
obs n.dollar create "$A/dom/\$x"
obs n.missing cat "$A/dom/never"
obs n.ls ls -a "$A/dom"
obs n.ls_b ls -a "$B/dom"                      # inodes are per node: B never opened it
obs n.stat stat -c '%F %a %s %o %b %h' "$A/dom/$(rep x 31)"
obs n.rm rm "$A/dom/$(rep x 31)"

# -- other directory operations ----------------------------------------------------------
create "$A/dom/o"
obs o.fifo mknod "$A/dom/fifo" p
obs o.symlink ln -s x "$A/dom/sl"
obs o.link ln "$A/dom/o" "$A/dom/hl"
obs o.rename mv -T "$A/dom/o" "$A/dom/o2"
obs o.chmod chmod 600 "$A/dom/o"
obs o.chmod_stat stat -c %a "$A/dom/o"
chmod 644 "$A/dom/o"
obs o.truncate truncate -s 0 "$A/dom/o"
obs o.truncate_stat stat -c %s "$A/dom/o"
exec 7< "$A/dom/o"
obs o.rm_busy rm "$A/dom/o"
exec 7<&-
obs o.rm rm "$A/dom/o"                         # no holder left, though still cached
obs o.rm_ls ls "$A/dom"
create "$A/dom/keep"
obs o.rmdir_not_empty rmdir "$A/dom"

# -- caching on one node, and trylocks from the other --------------------------------------
create "$B/dom/c"                              # B's inode first, then A takes it over
create "$A/dom/c"
exec 7< "$A/dom/c"                             # a PR holder on A
obs c.same_node_pr tryr "$A/dom/c"
obs c.same_node_ex tryw "$A/dom/c"             # PR upconverts to EX beside the PR holder
obs c.other_node_pr tryr "$B/dom/c"
exec 7<&-
obs c.cached_other_pr tryr "$B/dom/c"          # closed, but the lock stays cached on A
obs c.cached_other_ex tryw "$B/dom/c"
reopen() ( exec 6> "$1" && exec 5< "$1" && echo ok )
obs c.same_process_reopen reopen "$A/dom/c"
obs c.other_node_blocking_pr lvb "$B/dom/c"       # A is asked to give way, and does
obs c.pr_beside_pr tryr "$A/dom/c"             # A kept PR: compatible with B's PR
obs c.ex_beside_pr tryw "$A/dom/c"
obs c.b_upconvert tryw "$B/dom/c"

# -- a held lock is held as long as its open file description --------------------------
create "$B/dom/h"
create "$B/dom/s"
create "$B/dom/k"
create "$B/dom/cw"
ln -s "$A" "$T/alink"
exec 5> "$B/dom/cw"                            # B holds what A is about to create and wait for
exec 7> "$A/dom/h"                             # held by this shell
exec 6> "$T/alink/dom/s"                       # the same, reached through a symlink
# The opener exits at once; its child keeps the descriptor.
( exec 9> "$A/dom/k"; sleep 30 < /dev/null > /dev/null 2>&1 5>&- 6>&- 7>&- & echo $! > "$T/sleeper" )
waiter h "<" "$B/dom/h"
waiter s "<" "$B/dom/s"
waiter k "<" "$B/dom/k"
waiter cw ">" "$A/dom/cw"                      # O_CREAT, waiting for B
sleep 2                                        # long enough for a wrong grant to show
# The waiting O_CREAT open holds no lock of the directory: others list and create on.
obs x.ls_while_a_create_waits timeout 10 ls "$A/dom"
obs x.create_while_a_create_waits timeout 10 dd if=/dev/null of="$A/dom/cw2" oflag=nonblock status=none
obs x.create_waits granted cw
exec 5>&-
settle cw
obs x.create_granted granted cw
obs h.held granted h
obs s.held_through_symlink granted s
obs k.held_by_child granted k
exec 7>&- 6>&-
kill "$(< "$T/sleeper")"
settle h s k
obs h.granted_after_close granted h
obs s.granted_after_close granted s
obs k.granted_after_child granted k

# -- the value block -----------------------------------------------------------------------
printf hello > "$A/dom/v"
obs v.read lvb "$A/dom/v"
obs v.touch_b touch "$B/dom/v"                 # O_WRONLY|O_NONBLOCK|O_CREAT: inode, trylock
obs v.read_b lvb "$B/dom/v"                # handed over with the lock
# ddw FILE DATA [DD-ARGS...]: write DATA through dd (at an offset, with fsync...).
ddw() { local f=$1 d=$2; shift 2; printf '%s' "$d" | dd of="$f" conv=notrunc,nocreat status=none "$@"; }
ddr() { dd if="$1" bs=1 skip="$2" count="$3" status=none; }
prwrite() ( exec 3< "$1" && printf x >&3 )
obs v.pwrite_at_10 ddw "$A/dom/v" abc bs=1 seek=10
obs v.after_pwrite lvb "$A/dom/v"
obs v.read_at_1 ddr "$A/dom/v" 1 3
obs v.append append "$A/dom/v" Z
obs v.after_append lvb "$A/dom/v"
obs v.long write "$A/dom/v" "$(rep y 100)"
obs v.after_long lvb "$A/dom/v"
obs v.write_at_64 ddw "$A/dom/v" q bs=1 seek=64
obs v.write_on_pr prwrite "$A/dom/v"
obs v.fsync ddw "$A/dom/v" f conv=fsync
obs v.fdatasync ddw "$A/dom/v" g conv=fdatasync
obs v.truncate truncate -s 0 "$A/dom/v"
obs v.after_truncate lvb "$A/dom/v"
obs v.read_b_again lvb "$B/dom/v"
create "$A/dom/z"
obs v.never_written lvb "$A/dom/z"
printf kept > "$A/dom/w"
rm "$A/dom/w"
obs v.recreate tryc "$A/dom/w"
obs v.after_recreate lvb "$A/dom/w"

# -- a signal during a blocked open ----------------------------------------------------------
# dlmfs waits for the lock uninterruptibly; once the node has it, a pending signal fails the
# open (ERESTARTSYS: EINTR, as perl's sysopen does not retry) and the node keeps the lock
# cached, with no holder; a handler with SA_RESTART has the open restarted instead.
# sigopen NAME HANDLER: A holds NAME's EX; a perl on B opens it O_RDWR (and waits) with
# HANDLER (perl code installing a USR1 handler that prints "signal "), then gets SIGUSR1 while
# it waits; $T/NAME is what it prints. It closes A's descriptors: it must not hold A's lock.
# granting: A closes, and the opener ends.
sigopen() {
  local nr
  create "$B/dom/$1"
  exec 7> "$A/dom/$1"
  ( exec 5>&- 6>&- 7>&- && exec perl -MFcntl -e '$| = 1; eval $ARGV[1]; die $@ if $@;
    print "ready "; print sysopen(F, $ARGV[0], O_RDWR) ? "opened" : "$!"' "$B/dom/$1" "$2" \
    > "$T/$1" ) &
  opener=$!
  # Until it printed "ready" and sits in openat (syscall 257 on x86-64), at most 20 s.
  for _ in $(seq 200); do
    [ -s "$T/$1" ] && read -r nr _ < "/proc/$opener/syscall" && [ "$nr" = 257 ] && break
    sleep 0.1
  done
  kill -USR1 "$opener"
  sleep 0.5                                    # long enough for a wrongly ended wait to show
}
granting() { exec 7>&-; wait "$opener"; }
sigopen i '$SIG{USR1} = sub { print "signal " }'
obs i.signal_during_wait cat "$T/i"            # still waiting: the handler has not run
granting
obs i.after_grant cat "$T/i"
obs i.cached_other_node tryw "$A/dom/i"        # B's node kept the lock
obs i.cached_same_node tryw "$B/dom/i"         # with no holder
sigopen r 'require POSIX; POSIX::sigaction(POSIX::SIGUSR1(),
  POSIX::SigAction->new(sub { print "signal " }, POSIX::SigSet->new, POSIX::SA_RESTART()))'
obs r.signal_during_wait cat "$T/r"
granting
obs r.after_grant cat "$T/r"                   # dlmfs restarts the open: SA_RESTART

# -- permissions: the mode bits apply --------------------------------------------------------
create "$A/dom/p"
obs u.nobody_ls as_nobody ls "$A/dom"
obs u.nobody_read as_nobody dd if="$A/dom/p" of=/dev/null status=none
obs u.nobody_write as_nobody dd if=/dev/null of="$A/dom/p" conv=notrunc,nocreat status=none
obs u.nobody_create as_nobody dd if=/dev/null of="$A/dom/nobody" status=none

# -- leaving ---------------------------------------------------------------------------------
rm -f "$A"/dom/* "$B"/dom/*
obs d.rmdir rmdir "$A/dom"
obs d.rmdir_b rmdir "$B/dom"
obs d.ls_after ls -a "$A"
rm -rf "$T"
