# Sourced by the dm guest scripts: dmsetup, its libraries and the loader copied to the
# guest's tmpfs. Run from the 9p root, every dmsetup process reads them again over 9p,
# slowly under TCG (most of each run's time in a battery of ~300 runs).
# Sets DMBIN, the command line that runs the copy (add dmsetup's own options after it).
bin=/tmp/dmbin
mkdir -p $bin
cp /sbin/dmsetup $bin/
for lib in $(ldd /sbin/dmsetup | awk '$2 == "=>" { print $3 } $1 ~ /^\/lib/ { print $1 }'); do
  cp "$lib" $bin/
done
DMBIN="$bin/ld-linux-x86-64.so.2 --library-path $bin $bin/dmsetup"
