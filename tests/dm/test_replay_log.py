"""`minidisk replay-log` as a drop-in for xfstests' replay-log (src/log-writes).

The logs are written by our dm log-writes target on host files; every expected line, number
and exit status below is what xfstests' replay-log prints for the same log (each was checked
against a build of it). The workload, and so the log (blocks in 512-byte sectors; the super
is block 0)::

    entry  block  what                          data state after it
    0      1      write sectors 0-1, data 2-3
    1      4      FLUSH
    2      5      MARK "one"                    "one"
    3      6      FUA write sector 8, data 7
    4      8      DISCARD sectors 16-19
    5      9      FLUSH
    6      10     MARK "two"                    "two"
    7      11     write sectors 100-103, 12-15
    8      16     FLUSH
    9      17     MARK "three"                  "three"
    10     18     MARK "dm-log-writes-end"      (the table is removed)

`ENTRY@BLOCK` in the output is the entry's number and the block where the next entry starts
(--find) or where its data starts (-v).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.dm.dm_helpers import SECTOR, pattern, run, write
from tests.harness import MINIDISK

from minidisk.cli import replaylog
from minidisk.device.api import BlockDevice, BlockSize
from minidisk.device.file import FileDevice
from minidisk.dm import DeviceDict, Registry, writelog

DATA = 1 << 20
LOG = 4 << 20
ENTRIES = 11
PROG = "minidisk replay-log"


@dataclass(frozen=True)
class Workload:
    log: Path
    initial: bytes  # the data device before the log started
    states: dict[str, bytes]  # the data device at each mark
    tmp: Path

    def target(self, name: str = "replay") -> Path:
        """A fresh replay target holding the data device's initial bytes."""
        path = self.tmp / name
        path.write_bytes(self.initial)
        return path


Mark = Callable[[str], Awaitable[object]]


def log_writes(data_path: Path, log_path: Path,
               steps: Callable[[BlockDevice, Mark], Awaitable[None]],
               block_size: BlockSize | None = None) -> None:
    """Run `steps(dev, mark)` on `log-writes /dev/data /dev/log` over two host files, then
    remove the device (which logs the end mark)."""
    log_path.write_bytes(bytes(LOG))
    devices = [FileDevice(str(data_path), block_size=block_size), FileDevice(str(log_path))]
    ns = DeviceDict({"/dev/data": devices[0], "/dev/log": devices[1]})
    reg = Registry(ns, ns)

    async def go() -> None:
        dev = await reg.create("lw", f"0 {DATA // SECTOR} log-writes /dev/data /dev/log")
        await steps(dev, lambda name: reg.message("lw", 0, ["mark", name]))
        await reg.remove("lw")
        for device in devices:
            await device.close()

    run(go())


def record(tmp: Path, block_size: BlockSize | None = None) -> Workload:
    data_path, log_path = tmp / "data", tmp / "log"
    data_path.write_bytes(pattern(7, DATA))  # not zeroes, so that a discard shows
    initial = data_path.read_bytes()
    states: dict[str, bytes] = {}
    ss = block_size.minimum if block_size else SECTOR

    async def steps(dev: BlockDevice, mark: Mark) -> None:
        await write(dev, 0, pattern(1, 2 * ss))
        await dev.flush()
        await mark("one")
        states["one"] = data_path.read_bytes()
        await write(dev, 8 * ss, pattern(2, ss), fua=True)
        await dev.trim(16 * ss, 4 * ss)
        await dev.flush()
        await mark("two")
        states["two"] = data_path.read_bytes()
        await write(dev, 100 * ss, pattern(3, 4 * ss))
        await dev.flush()
        await mark("three")
        states["three"] = data_path.read_bytes()

    log_writes(data_path, log_path, steps, block_size)
    return Workload(log_path, initial, states, tmp)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    return record(tmp_path_factory.mktemp("replay-log"))


@dataclass(frozen=True)
class Result:
    status: int
    out: str
    err: str


def replay_log(*argv: str | Path) -> Result:
    """replay-log in this process (the command's own code, without click's wrapper)."""
    out, err = io.StringIO(), io.StringIO()
    status = replaylog.main([str(a) for a in argv], PROG, out, err)
    return Result(status, out.getvalue(), err.getvalue())


def lines(*text: str) -> str:
    return "".join(f"{line}\n" for line in text)


# --find


@pytest.mark.parametrize(("argv", "found"), [
    (["--end-mark", "one"], "2@6"),
    (["--end-mark", "two"], "6@11"),
    (["--end-mark", "three"], "9@18"),
    (["--next-fua"], "3@8"),
    (["--next-flush"], "1@5"),
    (["--next-flush", "--start-entry", "2"], "5@10"),
    (["--limit", "4"], "3@8"),  # the 4th entry
    (["--limit", "2", "--start-entry", "3"], "4@9"),  # counted from the start entry
    (["--start-mark", "one", "--end-mark", "three"], "9@18"),
    (["--start-mark", "one", "--next-flush"], "5@10"),  # starts after the mark
    # with a mark among the stop conditions only that mark stops it (the original's rule)
    (["--end-mark", "two", "--next-flush"], "6@11"),
])
def test_find_prints_the_entry_and_where_the_next_one_starts(
    work: Workload, argv: list[str], found: str,
) -> None:
    assert replay_log("--log", work.log, "--find", *argv) == Result(0, f"{found}\n", "")


@pytest.mark.parametrize("argv", [["--end-mark", "nope"], ["--end-mark", "thr"], []])
def test_find_without_a_match_fails(work: Workload, argv: list[str]) -> None:
    """A mark is matched whole ("thr" is not "three"); nothing to look for finds nothing."""
    assert replay_log("--log", work.log, "--find", *argv) == \
        Result(1, "", "Couldn't find entry\n")


# info mode and --num-entries


@pytest.mark.parametrize("argv", [[], ["-v"], ["--end-mark", "one"]])
def test_without_replay_it_prints_the_log_info(work: Workload, argv: list[str]) -> None:
    assert replay_log("--log", work.log, *argv) == \
        Result(0, f"Log version=1, sectorsize=512, entries={ENTRIES}\n", "")


def test_vv_prints_the_entries_it_seeks_over(work: Workload) -> None:
    assert replay_log("--log", work.log, "-vv", "--start-entry", "2").out == lines(
        "seek entry 0@1: 0, size 2, flags 0x0",
        "seek entry 1@4: 0, size 0, flags 0x1",
        f"Log version=1, sectorsize=512, entries={ENTRIES}",
    )


def test_num_entries(work: Workload) -> None:
    assert replay_log("--log", work.log, "--num-entries") == Result(0, f"{ENTRIES}\n", "")


# replay


@pytest.mark.parametrize("mark", ["one", "two", "three"])
def test_replay_to_a_mark_reproduces_the_device_then(work: Workload, mark: str) -> None:
    target = work.target()
    assert replay_log("--log", work.log, "--replay", target, "--end-mark", mark) == \
        Result(0, "", "")
    assert target.read_bytes() == work.states[mark]


def test_a_missing_end_mark_replays_everything_silently(work: Workload) -> None:
    target = work.target()
    assert replay_log("--log", work.log, "--replay", target, "--end-mark", "nope") == \
        Result(0, "", "")
    assert target.read_bytes() == work.states["three"]


def test_verbose_replay_lists_each_entry_and_the_switch_to_zeroes(work: Workload) -> None:
    """A regular file has no BLKDISCARD: the first discard says so and writes zeroes."""
    target = work.target()
    result = replay_log("--log", work.log, "--replay", target, "-v", "--end-mark", "two")
    assert result == Result(0, lines(
        "replaying 0@2: sector 0, size 1024, flags 0x0(NONE)",
        "replaying 1@5: sector 0, size 0, flags 0x1(FLUSH)",
        "replaying 2@6: sector 0, size 0, flags 0x8(MARK)",
        "replaying 3@7: sector 8, size 512, flags 0x2(FUA)",
        "replaying 4@9: sector 16, size 2048, flags 0x4(DISCARD)",
        "replay device doesn't support discard, switching to writing zeros",
        "replaying 5@10: sector 0, size 0, flags 0x1(FLUSH)",
        "replaying 6@11: sector 0, size 0, flags 0x8(MARK)",
    ), "")
    assert target.read_bytes() == work.states["two"]


def only_entries_3_and_4(work: Workload) -> bytes:
    """The initial bytes with the FUA write and the discard applied, nothing else."""
    want = bytearray(work.initial)
    want[8 * SECTOR:9 * SECTOR] = work.states["two"][8 * SECTOR:9 * SECTOR]
    want[16 * SECTOR:20 * SECTOR] = bytes(4 * SECTOR)
    return bytes(want)


@pytest.mark.parametrize("argv", [
    ["--start-entry", "3", "--limit", "2"],  # --limit counts from the start entry
    ["--start-mark", "one", "--end-mark", "two"],  # starts after the mark
    ["--start", "3", "--lim", "0x2"],  # abbreviations and C's number syntax
])
def test_replay_starts_where_told(work: Workload, argv: list[str]) -> None:
    target = work.target()
    assert replay_log("--log", work.log, "--replay", target, *argv) == Result(0, "", "")
    assert target.read_bytes() == only_entries_3_and_4(work)


def test_a_sector_range_skips_writes_outside_it_but_not_discards(work: Workload) -> None:
    """Only entries that touch sector 8 are written; discards are applied anywhere, as the
    original does (it tests the range after handling a discard)."""
    target = work.target()
    result = replay_log("--log", work.log, "--replay", target, "-vv", "--start-sector", "8",
                        "--end-sector", "8")
    assert result == Result(0, lines(
        "skipping 0@2: sector 0, size 1024, flags 0x0(NONE)",
        "replaying 1@5: sector 0, size 0, flags 0x1(FLUSH)",
        "replaying 2@6: sector 0, size 0, flags 0x8(MARK)",
        "replaying 3@7: sector 8, size 512, flags 0x2(FUA)",
        "skipping 4@9: sector 16, size 2048, flags 0x4(DISCARD)",
        "replay device doesn't support discard, switching to writing zeros",
        "replaying 5@10: sector 0, size 0, flags 0x1(FLUSH)",
        "replaying 6@11: sector 0, size 0, flags 0x8(MARK)",
        "skipping 7@12: sector 100, size 2048, flags 0x0(NONE)",
        "replaying 8@17: sector 0, size 0, flags 0x1(FLUSH)",
        "replaying 9@18: sector 0, size 0, flags 0x8(MARK)",
        "replaying 10@19: sector 0, size 0, flags 0x8(MARK)",
    ), "")
    assert target.read_bytes() == only_entries_3_and_4(work)
    # one -v lists what it replays only
    quiet = replay_log("--log", work.log, "--replay", work.target(), "-v", "--start-sector",
                       "8", "--end-sector", "8").out.splitlines()
    assert [line.split(":")[0] for line in quiet if line.startswith(("replaying", "skipping"))] \
        == ["replaying 1@5", "replaying 2@6", "replaying 3@7", "replaying 5@10",
            "replaying 6@11", "replaying 8@17", "replaying 9@18", "replaying 10@19"]


def test_no_discard_leaves_discarded_sectors_alone(work: Workload) -> None:
    target = work.target()
    result = replay_log("--log", work.log, "--replay", target, "-v", "--no-discard",
                        "--end-mark", "two")
    assert result.status == 0
    assert "doesn't support discard" not in result.out
    want = bytearray(work.states["two"])
    want[16 * SECTOR:20 * SECTOR] = work.initial[16 * SECTOR:20 * SECTOR]
    assert target.read_bytes() == bytes(want)


def test_a_discard_too_big_to_zero_is_skipped(tmp_path: Path) -> None:
    """Where discard fails, replay-log zeroes at most 128 MiB at once and skips a larger
    discard (a 1 GiB chunk of it) with a note at -v."""
    ss = SECTOR
    log = tmp_path / "log"
    entries = [writelog.encode_entry(0, 1, writelog.DISCARD, b"", ss),
               writelog.encode_entry(2, (129 << 20) // ss, writelog.DISCARD, b"", ss)]
    log.write_bytes(writelog.encode_super(len(entries), ss) + b"".join(entries))
    target = tmp_path / "replay"
    target.write_bytes(b"\xff" * (4 * ss))
    result = replay_log("--log", log, "--replay", target, "-v")
    assert result == Result(0, lines(
        "replaying 0@2: sector 0, size 512, flags 0x4(DISCARD)",
        "replay device doesn't support discard, switching to writing zeros",
        "replaying 1@3: sector 2, size 135266304, flags 0x4(DISCARD)",
        "discard len 135266304 larger than max 134217728",
    ), "")
    assert target.read_bytes() == bytes(ss) + b"\xff" * (3 * ss)


def test_a_4k_sector_log_counts_in_4k_blocks(tmp_path: Path) -> None:
    w = record(tmp_path, BlockSize(4096, 4096))
    assert replay_log("--log", w.log).out == \
        f"Log version=1, sectorsize=4096, entries={ENTRIES}\n"
    assert replay_log("--log", w.log, "--find", "--end-mark", "two").out == "6@11\n"
    target = w.target()
    assert replay_log("--log", w.log, "--replay", target, "--end-mark", "two").status == 0
    assert target.read_bytes() == w.states["two"]


# --check and --fsck


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("check", "at"), [
    ("flush", ["one", "two", "three"]),  # after entries 1, 5 and 8
    ("3", ["one", "two", "three"]),  # after the 3rd, 6th and 9th: entries 2, 5 and 8
    ("fua", ["fua"]),  # entry 3
    ("discard", ["two"]),  # entry 4: the data is then as at mark two
])
def test_check_runs_the_command_on_the_replayed_device(
    work: Workload, check: str, at: list[str],
) -> None:
    target = work.target()
    seen = work.tmp / f"seen-{check}"
    result = replay_log("--log", work.log, "--replay", target, "--check", check,
                        "--fsck", f"sha256sum {target} | cut -d' ' -f1 >> {seen}")
    assert result == Result(0, "", "")
    fua = bytearray(work.states["one"])
    fua[8 * SECTOR:9 * SECTOR] = work.states["two"][8 * SECTOR:9 * SECTOR]
    states = {**work.states, "fua": bytes(fua)}
    assert seen.read_text().split() == [digest(states[name]) for name in at]
    assert target.read_bytes() == work.states["three"]  # and the replay went on to the end


@pytest.mark.parametrize(("command", "why"), [
    ("exit 3", "exit status 3"),
    # the original takes a signalled command for a clean one (WEXITSTATUS is 0); we do not
    ("kill -9 $$", "killed by signal 9"),
])
def test_a_failing_check_stops_the_replay(work: Workload, command: str, why: str) -> None:
    target = work.target()
    result = replay_log("--log", work.log, "--replay", target, "--check", "flush",
                        "--fsck", command)
    assert result == Result(1, "", f"Fsck errored out on entry 1 ({why})\n")
    assert target.read_bytes() == work.states["one"]


@pytest.mark.parametrize("argv", [["--check", "flush"], ["--fsck", "true"]])
def test_check_and_fsck_go_together(work: Workload, argv: list[str]) -> None:
    target = work.target()
    result = replay_log("--log", work.log, "--replay", target, *argv)
    assert (result.status, result.out) == (1, "")
    assert result.err.splitlines()[:2] == [f"{PROG}: --fsck and --check go together",
                                           "Usage: replay-log --log <logfile> [options]"]
    assert target.read_bytes() == work.initial


# the command line


@pytest.mark.parametrize(("argv", "found"), [
    (["--log=LOG", "--end-mark=two", "--find"], "6@11"),
    (["--l", "LOG", "--e", "two", "--fi"], "6@11"),  # --l is --log, --e --end-mark
    (["--log", "LOG", "--find", "--next", "--start", "2"], "5@10"),  # next-flush, start-entry
    (["--log", "LOG", "stray", "--find", "--end-mark", "two"], "6@11"),  # non-options ignored
    (["--log", "LOG", "--find", "--end-mark", "two", "--", "--limit", "1"], "6@11"),
    (["--log", "LOG", "--find", "--limit", "0x4"], "3@8"),
    (["--log", "LOG", "--find", "--start-entry", "010", "--next-flush"], "8@17"),  # octal
    (["--log", "LOG", "--find", "--limit", "", "--next-fua"], "3@8"),  # "" is 0: no limit
    (["--log", "LOG", "-vvv", "--verb", "--find", "--end-mark", "-v"], None),  # a mark "-v"
])
def test_getopt_long_syntax(work: Workload, argv: list[str], found: str | None) -> None:
    result = replay_log(*[a.replace("LOG", str(work.log)) for a in argv])
    if found is None:
        assert result.status == 1 and result.err == "Couldn't find entry\n"
        assert result.out.startswith("seek entry 0@2: 0, size 2, flags 0x0(NONE)\n")  # -vv+
    else:
        assert result == Result(0, f"{found}\n", "")


@pytest.mark.parametrize(("argv", "error"), [
    (["--log", "MISSING"], "Couldn't open log MISSING: 2 (No such file or directory)"),
    (["--log", "LOG", "--replay", "MISSING"],
     "Couldn't open replay file MISSING: 2 (No such file or directory)"),
    (["--log", "DATA"], "Magic doesn't match: not a dm-log-writes log (magic 0x"),
    (["--log", "LOG", "--limit", "12x"], "Invalid entry number '12x' (--limit)"),
    (["--log", "LOG", "--start-entry", "08"], "Invalid entry number '08' (--start-entry)"),
    (["--log", "LOG", "--start-entry", "11"], "Invalid entry number 11: the log has 11 entries"),
    (["--log", "LOG", "--check", "0", "--fsck", "true"], "Invalid entry number '0' (--check"),
    (["--log", "LOG", "--end-sector", "1.5"], "Invalid sector number '1.5' (--end-sector)"),
    (["--log", "LOG", "--start-mark", "nope"], "Couldn't find starting mark 'nope'"),
    (["--log", "LOG", "--bogus=1"], f"{PROG}: unrecognized option '--bogus=1'"),
    (["--log", "LOG", "--f"], f"{PROG}: option '--f' is ambiguous; possibilities: '--find' "
                              "'--fsck'"),
    (["--log", "LOG", "--find=1"], f"{PROG}: option '--find' doesn't allow an argument"),
    (["--log", "LOG", "-vx"], f"{PROG}: invalid option -- 'x'"),
    (["--log"], f"{PROG}: option '--log' requires an argument"),
    (["--find"], "Usage: replay-log --log <logfile> [options]"),
])
def test_bad_input_is_named_on_one_line(work: Workload, argv: list[str], error: str) -> None:
    names = {"LOG": str(work.log), "DATA": str(work.tmp / "data"),
             "MISSING": str(work.tmp / "missing")}
    result = replay_log(*[names.get(a, a) for a in argv])
    error = error.replace("MISSING", names["MISSING"])
    assert (result.status, result.out) == (1, "")
    assert result.err.splitlines()[0].startswith(error)
    if error.startswith(PROG) or error.startswith("Usage"):  # usage follows, as there
        assert "\t-vv - print also skipped ops" in result.err
    else:
        assert len(result.err.splitlines()) == 1


def test_a_malformed_entry_stops_find_and_replay(tmp_path: Path, work: Workload) -> None:
    """Entry 4's header block (block 8) not zero after its 32 bytes: 'malformed'. --find then
    fails with the original's -1 (exit status 255), a replay with 1, after entries 0-3."""
    raw = bytearray(work.log.read_bytes())
    raw[8 * SECTOR + 32] = 1
    log = tmp_path / "log"
    log.write_bytes(raw)
    assert replay_log("--log", log, "--find", "--end-mark", "two") == \
        Result(255, "", "Malformed entry @8 (entry 4)\n")
    target = work.target()
    assert replay_log("--log", log, "--replay", target) == \
        Result(1, "", "Malformed entry @8 (entry 4)\n")
    want = bytearray(work.states["one"])
    want[8 * SECTOR:9 * SECTOR] = work.states["two"][8 * SECTOR:9 * SECTOR]
    assert target.read_bytes() == bytes(want)


def test_a_truncated_log_is_an_error(tmp_path: Path, work: Workload) -> None:
    log = tmp_path / "log"
    log.write_bytes(work.log.read_bytes()[:2000])  # inside entry 0's data
    target = work.target()
    result = replay_log("--log", log, "--replay", target)
    assert (result.status, result.out) == (1, "")
    assert result.err.startswith("Error reading data: entry 0 runs past the end of the log")
    assert target.read_bytes() == work.initial  # nothing of a short entry is written
    assert replay_log("--log", log, "--find", "--next-flush").status == 255


# the installed command


@pytest.mark.parametrize(("argv", "status", "out"), [
    (["--log", "LOG", "--find", "--end-mark", "two"], 0, "6@11\n"),
    (["--log", "LOG", "--find", "--", "--end-mark", "two"], 1, ""),  # click keeps "--"
    (["--log", "LOG", "--num-entries"], 0, f"{ENTRIES}\n"),
    (["--log", "LOG", "--bogus"], 1, ""),
    (["--help"], 0, "Usage: replay-log --log <logfile> [options]\n"),
])
def test_the_command(work: Workload, argv: list[str], status: int, out: str) -> None:
    proc = subprocess.run([MINIDISK, "replay-log", *[str(work.log) if a == "LOG" else a
                                                     for a in argv]],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout.startswith(out) and (out or not proc.stdout)


def test_the_command_replays(work: Workload) -> None:
    target = work.target()
    proc = subprocess.run([MINIDISK, "replay-log", "--log", str(work.log), "--replay",
                           str(target), "--end-mark", "two"], capture_output=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert target.read_bytes() == work.states["two"]


# a block device: discards are BLKDISCARD


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A loop device over a 1 MiB file of random bytes (the host kernel has loop)."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(pattern(9, DATA))
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                          text=True, check=True, timeout=30)
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=True, timeout=30)


def test_replay_onto_a_block_device_discards_with_blkdiscard(
    tmp_path: Path, loop_device: Path,
) -> None:
    """A discard on a device that has discard is BLKDISCARD, not zeroes written: no note
    about switching to zeroes, and the loop device (which punches the backing file) reads
    zero there, as a regular file does after the zeroes."""
    ss = SECTOR
    data_path, log_path = tmp_path / "data", tmp_path / "log"
    data_path.write_bytes(loop_device.read_bytes())

    async def steps(dev: BlockDevice, mark: Mark) -> None:
        await write(dev, 0, pattern(1, 8 * ss))
        await dev.trim(8 * ss, 16 * ss)  # 4 KiB-aligned, so that loop's discard takes it
        await dev.flush()
        await mark("done")

    log_writes(data_path, log_path, steps)
    discards = int(Path(f"/sys/block/{loop_device.name}/queue/discard_max_bytes").read_text())
    assert discards > 0, "the loop device has no discard: this test needs one that does"
    result = replay_log("--log", log_path, "--replay", loop_device, "-v")
    assert result == Result(0, lines(
        "replaying 0@2: sector 0, size 4096, flags 0x0(NONE)",
        "replaying 1@11: sector 8, size 8192, flags 0x4(DISCARD)",
        "replaying 2@12: sector 0, size 0, flags 0x1(FLUSH)",
        "replaying 3@13: sector 0, size 0, flags 0x8(MARK)",
        "replaying 4@14: sector 0, size 0, flags 0x8(MARK)",
    ), "")
    assert loop_device.read_bytes()[:DATA] == data_path.read_bytes()
