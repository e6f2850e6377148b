"""`minidisk replay-log`: xfstests' replay-log (src/log-writes), option for option.

Scripts written for the original (fstests' common/dmlogwrites, btrfs/192, btrfs/291) run
it for its exit status and parse `--find`'s `ENTRY@BLOCK` and `--num-entries`, so those,
the option syntax and the stdout lines are the original's. The command line is parsed
with getopt_long's rules, not click's: unique-prefix abbreviations (where options that
take the same kind of argument do not count as ambiguous: `--start` is `--start-entry`),
`--opt=value`, arguments permuted past non-options (which are ignored), `--` ending
options, and C's `strtoull(…, 0)` for numbers (`0x10`, `010`, and "" for 0). Error lines
keep the original's words and add the value or the reason it leaves out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import click

from minidisk.cli.progress import Progress
from minidisk.dm.writelog import DISCARD, FLUSH, FUA, MARK, LogCursor, LogError, Replayer, matches

U64 = (1 << 64) - 1

# The original's long options, in its order: an abbreviation means the first that it starts
# (getopt_long), and only options of another kind (argument or not; `verbose` is `-v`)
# make it ambiguous. `--help` (in full only) is ours: the original has none.
LONG_OPTIONS: tuple[tuple[str, bool], ...] = (
    ("next-flush", False), ("next-fua", False), ("start-entry", True), ("end-mark", True),
    ("log", True), ("replay", True), ("limit", True), ("verbose", False), ("find", False),
    ("num-entries", False), ("no-discard", False), ("fsck", True), ("check", True),
    ("start-mark", True), ("start-sector", True), ("end-sector", True),
)
_KIND = {"verbose": "v"}  # getopt_long's `val`: 0 for the others

# The longest mark the original compares (strndup(optarg, 4097 - sizeof(entry))).
MAX_MARK = 4097 - 40

USAGE = """\
Usage: replay-log --log <logfile> [options]
\t--replay <device> - replay onto a specific device
\t--limit <number> - number of entries to replay
\t--next-flush - replay to/find the next flush
\t--next-fua - replay to/find the next fua
\t--start-entry <entry> - start at the given entry #
\t--start-mark <mark> - mark to start from
\t--end-mark <mark> - replay to/find the given mark
\t--find - put replay-log in find mode, will search based on the other options
\t--num-entries - print the number of entries in the log
\t--no-discard - don't process discard entries
\t--fsck - the fsck command to run, must specify --check
\t--check [<number>|flush|fua|discard] when to check the file system, must specify --fsck
\t--start-sector <sector> - replay ops on region from <sector> onto <device>
\t--end-sector <sector> - replay ops on region to <sector> onto <device>
\t-v or --verbose - print replayed ops
\t-vv - print also skipped ops
"""


class Usage(Exception):
    """Print the line (if any), then the usage; exit 1."""


class BadValue(Exception):
    """Print the line; exit 1."""


def getopt_long(argv: list[str], prog: str) -> list[tuple[str, str | None]]:
    """(option, argument) pairs in command-line order; `v` for `-v`. Raises Usage with
    glibc's message for an unknown, ambiguous or misused option."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue  # a non-option: permuted to the end, and nothing reads it
        if not arg.startswith("--"):
            for ch in arg[1:]:
                if ch != "v":
                    raise Usage(f"{prog}: invalid option -- '{ch}'")
                out.append(("v", None))
            continue
        body = arg[2:]
        if body == "help":
            out.append(("help", None))
            continue
        name, eq, value = body.partition("=")
        found = _long_option(name, body, prog)
        takes = dict(LONG_OPTIONS)[found]
        if eq and not takes:
            raise Usage(f"{prog}: option '--{found}' doesn't allow an argument")
        if takes and not eq:
            if i == len(argv):
                raise Usage(f"{prog}: option '--{found}' requires an argument")
            value = argv[i]
            i += 1
        out.append((found, value if takes else None))
    return out


def _long_option(name: str, body: str, prog: str) -> str:
    names = [n for n, _ in LONG_OPTIONS]
    if name in names:
        return name
    candidates = [(n, takes) for n, takes in LONG_OPTIONS if n.startswith(name)]
    if not candidates:
        raise Usage(f"{prog}: unrecognized option '--{body}'")
    first, first_takes = candidates[0]
    kind = (first_takes, _KIND.get(first))
    others = [n for n, takes in candidates[1:] if (takes, _KIND.get(n)) != kind]
    if others:
        listed = " ".join(f"'--{n}'" for n in [first, *others])
        raise Usage(f"{prog}: option '--{body}' is ambiguous; possibilities: {listed}")
    return first


def strtoull(text: str) -> int | None:
    """`strtoull(text, &end, 0)` where `*end` must be the string's end: None if not. A sign
    wraps ("-1" is 2**64 - 1), overflow saturates, and "" is 0, as in C."""
    s = text.lstrip(" \t\n\v\f\r")
    negative = s[:1] == "-"
    if s[:1] in ("+", "-"):
        s = s[1:]
    base = 10
    if s[:2].lower() == "0x" and s[2:3] and s[2:3] in "0123456789abcdefABCDEF":
        base, s = 16, s[2:]
    elif s[:1] == "0":
        base = 8
    digits = "0123456789abcdef"[:base]
    n = 0
    while n < len(s) and s[n].lower() in digits:
        n += 1
    if n == 0:
        return 0 if text == "" else None  # no number: `end` is the start of the text
    if n != len(s):
        return None
    value = min(int(s, base), U64)
    return (-value) & U64 if negative else value


@dataclass
class Options:
    log: str | None = None
    replay: str | None = None
    limit: int = 0  # 0: no limit
    start_entry: int = 0
    start_mark: bytes | None = None
    end_mark: bytes | None = None
    stop_flags: int = 0
    find: bool = False
    num_entries: bool = False
    discard: bool = True
    fsck: str | None = None
    check: int | str | None = None  # every N entries, or "flush", "fua", "discard"
    start_sector: int = 0
    end_sector: int = U64
    verbose: int = 0
    help: bool = False


def _number(text: str, what: str, option: str) -> int:
    value = strtoull(text)
    if value is None:
        raise BadValue(f"Invalid {what} number {text!r} (--{option})")
    return value


def _mark(text: str) -> bytes:
    return os.fsencode(text)[:MAX_MARK]  # the bytes the shell passed, as C sees them


def parse(argv: list[str], prog: str) -> Options:
    """Options in order, each checked as it comes (so the first bad one is the one named)."""
    o = Options()
    for name, value in getopt_long(argv, prog):
        arg = value or ""
        if name == "v" or name == "verbose":
            o.verbose += 1
        elif name == "help":
            o.help = True
            return o
        elif name == "next-flush":
            o.stop_flags |= FLUSH
        elif name == "next-fua":
            o.stop_flags |= FUA
        elif name == "start-entry":
            o.start_entry = _number(arg, "entry", name)
        elif name == "start-mark":
            o.start_mark = _mark(arg)
        elif name == "end-mark":
            o.end_mark = _mark(arg)
            o.stop_flags |= MARK
        elif name == "log":
            o.log = arg
        elif name == "replay":
            o.replay = arg
        elif name == "limit":
            o.limit = _number(arg, "entry", name)
        elif name == "find":
            o.find = True
        elif name == "num-entries":
            o.num_entries = True
        elif name == "no-discard":
            o.discard = False
        elif name == "fsck":
            o.fsck = arg
        elif name == "check":
            if arg in ("flush", "fua", "discard"):
                o.check = arg
            else:
                every = strtoull(arg)
                if not every:
                    raise BadValue(f"Invalid entry number {arg!r} (--check takes a count "
                                   "above 0, flush, fua or discard)")
                o.check = every
        elif name == "start-sector":
            o.start_sector = _number(arg, "sector", name)
        elif name == "end-sector":
            o.end_sector = _number(arg, "sector", name)
    return o


def _open(path: str, flags: int, what: str) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise LogError(f"Couldn't open {what} {path}: {e.errno} ({e.strerror})") from None


def main(argv: list[str], prog: str = "replay-log", out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run replay-log with `argv`; return its exit status."""
    stdout = out or sys.stdout
    stderr = err or sys.stderr
    try:
        o = parse(argv, prog)
        if o.help:
            stdout.write(USAGE)
            return 0
        if o.log is None:
            raise Usage()
    except Usage as e:
        stderr.write("".join(f"{line}\n" for line in e.args) + USAGE)
        return 1
    except BadValue as e:
        stderr.write(f"{e}\n")
        return 1

    def echo(line: str) -> None:
        stdout.write(f"{line}\n")

    fds: list[int] = []
    try:
        fds.append(_open(o.log, os.O_RDONLY, "log"))
        if o.replay is not None:
            fds.append(_open(o.replay, os.O_WRONLY, "replay file"))
        return _run(o, fds, echo, stdout, stderr, prog)
    except LogError as e:
        stderr.write(f"{e}\n")
        return 1
    finally:
        stdout.flush()
        for fd in fds:
            os.close(fd)


def _run(o: Options, fds: list[int], echo: Callable[[str], None], stdout: TextIO,
         stderr: TextIO, prog: str) -> int:
    log = LogCursor(fds[0], trace=echo if o.verbose > 1 else None)
    if o.start_mark is not None:
        log.seek_mark(o.start_mark)
    else:
        log.seek(o.start_entry)
    # checked only now, after the log: the original's order, which decides what is reported
    if (o.fsck is None) != (o.check is None):
        stderr.write(f"{prog}: --fsck and --check go together\n{USAGE}")
        return 1

    if o.find:
        count = 0
        try:
            while (entry := log.next()) is not None:
                count += 1
                if (o.limit and count == o.limit) or matches(entry, o.stop_flags, o.end_mark):
                    echo(f"{entry.index}@{log.block}")
                    return 0
        except LogError as e:  # a broken log ends the search with the original's -1
            stderr.write(f"{e}\n")
            return 255
        stderr.write("Couldn't find entry\n")
        return 1

    if o.num_entries:
        echo(str(log.nr_entries))
        return 0

    if o.replay is None:  # info mode: nothing is replayed
        echo(f"Log version=1, sectorsize={log.sectorsize}, entries={log.nr_entries}")
        return 0

    replayer = Replayer(log, fds[1], discard=o.discard, start_sector=o.start_sector,
                        end_sector=o.end_sector, verbose=o.verbose, echo=echo)
    count = 0
    # On a terminal only: the original prints nothing while it replays, and scripts read
    # its stderr.
    progress = Progress(f"replaying {o.log}", total=log.nr_entries, unit=" entries",
                        plain=False, stream=stderr)
    try:
        with progress:
            while (entry := replayer.next()) is not None:
                count += 1
                progress.update(entry.index + 1)
                if o.fsck is not None and _check_due(o.check, count, entry.flags):
                    failure = _fsck(o.fsck, replayer, stdout)
                    if failure:
                        stderr.write(f"Fsck errored out on entry {entry.index} ({failure})\n")
                        return 1
                if (o.limit and count == o.limit) or matches(entry, o.stop_flags,
                                                              o.end_mark):
                    break
    finally:
        try:
            replayer.sync()
        except OSError:
            pass  # the original ignores it too: the writes themselves succeeded
    return 0


def _check_due(check: int | str | None, count: int, flags: int) -> bool:
    if isinstance(check, int):
        return count % check == 0
    bit = {"flush": FLUSH, "fua": FUA, "discard": DISCARD}.get(check or "", 0)
    return bool(flags & bit)


def _fsck(command: str, replayer: Replayer, stdout: TextIO) -> str | None:
    """Run the check command on the synced target, as system(3) does; why it failed, or
    None. Unlike the original, a command killed by a signal fails the check (WEXITSTATUS of
    a signalled status is 0, so the original took a crashed fsck for a clean one)."""
    try:
        replayer.sync()
    except OSError as e:
        return f"fsync: {e.strerror}"
    stdout.flush()  # its output follows ours
    try:
        status = subprocess.run(command, shell=True, check=False).returncode
    except OSError as e:
        return f"cannot run it: {e.strerror}"
    if status < 0:
        return f"killed by signal {-status}"
    return f"exit status {status}" if status else None


class _OwnArguments(click.Command):
    """Hands the command line over unparsed: replay-log's syntax is getopt_long's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.params["argv"] = list(args)
        return []


@click.command(name="replay-log", cls=_OwnArguments, add_help_option=False)
@click.pass_context
def replay_log(ctx: click.Context, argv: list[str]) -> None:
    """Replay a log-writes log onto a device, up to an entry or a mark (xfstests style).

    The options, output and exit statuses are xfstests' replay-log's; see --help.
    """
    # `replay-log -vv ... | head` ends quietly on SIGPIPE, as the C program does, rather
    # than with a BrokenPipeError traceback
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ctx.exit(main(argv, ctx.command_path))


def register(cli: click.Group) -> None:
    cli.add_command(replay_log)
