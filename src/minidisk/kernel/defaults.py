"""Attach's defaults and limits, apart from the code that uses them: the CLI's --help shows
them without importing the backends (every `minidisk` command pays for what it imports, and
in a TCG guest an import costs ~100x what it does here)."""

# Seconds before the kernel gives up on a request the server never answered and fails it (and
# every later one) with EIO; 0 waits forever, as nbd-client does without -t.
DEFAULT_TIMEOUT = 60
MAX_CONNECTIONS = 64  # nbd-client -C has no limit; each one is a socket and a kernel thread
DEFAULT_PERSIST_WAIT = 300  # --persist: seconds I/O waits for the server to come back
KEEPER = "nbd-keeper"  # the Helper name of a --persist keeper, so detach stops it first
