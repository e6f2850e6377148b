"""dm's on-disk formats with 6.1's kernel as the judge, a guest per format (python=False:
the shell, the real dmsetup and losetup only).

guest/dm_formats.sh runs the guest/dm_formats_NAME.sh fragment it is given; the fragment
reads what the host prepared for it (a read-only directory, `INPUT/NAME`) and leaves its
results in `$RESULTS/NAME`. A fragment's host half is the module tests/vm/dm_formats_NAME.py,
whose `prepare(directory)` lays out the input before the boot and returns what the host's
tests compare with. Adding a format is two files and its tests below.

Snapshot (dm_formats_snapshot.py): every scenario runs on minidisk and on dm-snapshot from
the same files; the rows of every operation, the files they end with (byte for byte), and
each side's files opened by the other must agree.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from tests.vm import dm_formats_crypt as crypt
from tests.vm import dm_formats_integrity as integ
from tests.vm import dm_formats_snapshot as snap
from tests.vm import dm_formats_thin as thin
from tests.vm.harness import GUEST_SCRIPTS, Boot, GuestRun, guest_script, kernel_crash

from minidisk.dm.integrity_format import Geometry, plan_replay

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]

FRAGMENT = "dm_formats_"


@dataclass
class Formats:
    runs: dict[str, GuestRun]  # fragment name -> the guest it ran in
    inputs: Path
    prepared: dict[str, object]  # fragment name -> what its prepare() returned
    fragments: list[str]  # those the guests ran (found before the boots)

    def out(self, fragment: str) -> Path:
        return self.runs[fragment].results / fragment

    def dmesg(self, fragment: str) -> str:
        return (self.runs[fragment].results / "dmesg").read_text()

    def log_tail(self, fragment: str) -> str:
        """What a failing comparison shows besides the rows: the fragment's stderr."""
        lines = (self.out(fragment) / "log").read_text().splitlines()[-30:]
        return f"\n--- guest/{FRAGMENT}{fragment}.sh output (tail) ---\n" + "\n".join(lines)


def fragments() -> list[str]:
    return sorted(p.stem.removeprefix(FRAGMENT) for p in GUEST_SCRIPTS.glob(f"{FRAGMENT}*.sh"))


@pytest.fixture(scope="module")
def formats(boot: Boot, tmp_path_factory: pytest.TempPathFactory) -> Formats:
    inputs = tmp_path_factory.mktemp("dm-formats-input")
    prepared: dict[str, object] = {}
    names = fragments()
    logging.disable(logging.ERROR)  # the snapshots' invalidations are expected here
    try:
        for name in names:
            module = importlib.import_module(f"tests.vm.{FRAGMENT}{name}")
            prepare: Callable[[Path], object] = module.prepare
            prepared[name] = prepare(inputs / name)
    finally:
        logging.disable(logging.NOTSET)
    # One guest per fragment: 6.1.0-57 has corrupted its page allocator's free lists in
    # guests that ran every fragment ("list_del corruption" in get_page_from_freelist, at
    # different steps: a snapshot table load, dm-thin-pool's module load, a dd), never in a
    # guest that ran one; in one boot for all, one such oops failed every fragment after it.
    # A boot costs a few seconds of guest time; a kernel bug then fails only its own rows.
    runs = {}
    for name in names:
        run = _run_fragment(boot, inputs, name)
        crash = kernel_crash((run.results / "dmesg").read_text())
        if crash:
            # Even in a guest of its own, the same kernel now and then oopses in the middle
            # of a fragment (a dmsetup killed, its rows empty): the rows after it are the
            # broken kernel's, not 6.1's. One fresh guest; a second crash fails with both.
            again = _run_fragment(boot, inputs, name, "-again")
            second = kernel_crash((again.results / "dmesg").read_text())
            if second:
                pytest.fail(f"6.1 crashed in both guests of {name}:\n{crash}\n---\n{second}")
            with open(tmp_path_factory.getbasetemp() / "vm-boots.txt", "a") as f:
                f.write(f"dm formats {name}: second guest (the first crashed)\n{crash}")
            run = again
        runs[name] = run
    return Formats(runs, inputs, prepared, names)


def _run_fragment(boot: Boot, inputs: Path, name: str, suffix: str = "") -> GuestRun:
    run = boot(f"dm-formats-{name}{suffix}", guest_script("dm_formats.sh", str(inputs), name),
               vng_args=[f"--rodir={inputs}"])
    status = run.results / name / "status"
    assert status.exists(), f"fragment {name} did not run\n{run.explain()}"
    return run


def test_every_fragment_finished(formats: Formats) -> None:
    for name in formats.fragments:
        out = formats.out(name)
        assert (out / "status").read_text().strip() == "0", (
            f"{name}: {(out / 'log').read_text()}\n{formats.runs[name].explain()}")


def test_guest_time_is_small(formats: Formats) -> None:
    """Each fragment's guest time, for the record (never a bound: the machine is shared)."""
    for name in formats.fragments:
        seconds = float((formats.out(name) / "seconds").read_text())
        print(f"dm_formats_{name}: {seconds:.1f} s in the guest")


# Snapshot

SCENARIOS = [s.name for s in snap.SCENARIOS]


def _scenario(name: str) -> snap.Scenario:
    return next(s for s in snap.SCENARIOS if s.name == name)


def _show(rows: snap.Rows, key: str) -> str:
    value = rows.get(key)
    if value is None:
        return "<missing>"
    if not key.endswith((".rc", ".status", ".table")):
        return f"<{len(value)} bytes>"
    return value.decode(errors="replace").strip()


def _differences(ours: snap.Rows, kernels: snap.Rows, what: str) -> list[str]:
    out = []
    for key in sorted(set(ours) | set(kernels)):
        mine, theirs = ours.get(key), kernels.get(key)
        if mine == theirs:
            continue
        detail = ""
        if mine is not None and theirs is not None and not key.endswith(
                (".rc", ".status", ".table")):
            blocks = [i // snap.K for i in range(0, max(len(mine), len(theirs)), snap.K)
                      if mine[i:i + snap.K] != theirs[i:i + snap.K]]
            detail = f" (4 KiB blocks differing: {blocks[:10]})"
        out.append(f"{what} {key}: minidisk {_show(ours, key)!r}, "
                   f"kernel {_show(kernels, key)!r}{detail}")
    return out


def _host(formats: Formats, scenario: str) -> snap.Rows:
    rows = cast(dict[str, snap.Rows], formats.prepared["snapshot"])
    return rows[scenario]


def _ops(rows: snap.Rows) -> snap.Rows:
    return {k: v for k, v in rows.items() if not k.startswith("host.")}


def _opened(rows: snap.Rows) -> snap.Rows:
    return {k: v for k, v in rows.items() if k.startswith("host.")}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_snapshot_run_agrees(formats: Formats, scenario: str) -> None:
    """Every operation's rows: statuses and tables of every device, exit statuses, every
    device's contents."""
    kernel = _ops(snap.guest_rows(formats.out("snapshot") / scenario))
    ours = _ops(_host(formats, scenario))
    assert not _differences(ours, kernel, scenario), "\n".join(
        _differences(ours, kernel, scenario)) + formats.log_tail("snapshot")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_snapshot_files_are_the_kernels_byte_for_byte(formats: Formats,
                                                      scenario: str) -> None:
    """disk.img: the origin and every COW device, header, areas and data chunks."""
    mine = (formats.inputs / "snapshot" / scenario / "host" / "disk.img").read_bytes()
    theirs = (formats.out("snapshot") / scenario / "kernel" / "disk.img").read_bytes()
    if mine != theirs:
        places = _scenario(scenario).places()
        wrong = []
        for i, (start, length) in enumerate(places):
            a, b = start * snap.SECTOR, (start + length) * snap.SECTOR
            sectors = [(at - a) // snap.SECTOR for at in range(a, b, snap.SECTOR)
                       if mine[at:at + snap.SECTOR] != theirs[at:at + snap.SECTOR]]
            if sectors:
                wrong.append(f"{'origin' if i == 0 else f'cow{i - 1}'}: sectors {sectors[:20]}")
        pytest.fail(f"{scenario}: " + "; ".join(wrong))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kernel_reads_our_store(formats: Formats, scenario: str) -> None:
    kernel = _opened(snap.guest_rows(formats.out("snapshot") / scenario))
    ours = _opened(_host(formats, scenario))
    assert ours["host.rc"] == b"0\n"
    assert not _differences(ours, kernel, scenario), "\n".join(
        _differences(ours, kernel, scenario)) + formats.log_tail("snapshot")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_we_read_the_kernels_store(formats: Formats, scenario: str) -> None:
    kernel = formats.out("snapshot") / scenario / "kernel"
    ours = asyncio.run(snap.open_files(_scenario(scenario), kernel, "host"))
    theirs = _opened(snap.guest_rows(formats.out("snapshot") / scenario))
    assert not _differences(ours, theirs, scenario), "\n".join(
        _differences(ours, theirs, scenario)) + formats.log_tail("snapshot")


def test_merge_wrote_the_snapshot_back(formats: Formats) -> None:
    """Not a comparison: the kernel's merged origin is what s0 read before, and s1 still
    reads what it read (the merge copied out to it first)."""
    rows = snap.guest_rows(formats.out("snapshot") / "merge")
    ops = _scenario("merge").ops
    before, merge = ops.index("dump") + 1, ops.index("merge s0") + 1
    after = merge + 1
    assert rows[f"{after:03d}.m"] == rows[f"{before:03d}.s0"]
    assert rows[f"{after:03d}.s1"] == rows[f"{before:03d}.s1"]
    assert b"merge.m: 0 512 snapshot-merge 16/512 16\n" in rows[f"{merge:03d}.status"]


def test_snapshot_refusals(formats: Formats) -> None:
    out = formats.out("snapshot") / "refuse"
    reasons = snap.kernel_refusals(formats.dmesg("snapshot"))
    wrong = []
    logging.disable(logging.ERROR)
    try:
        for n, table in enumerate(snap.REFUSALS, 1):
            rc = int((out / f"{n}.rc").read_text())
            table_out = (out / f"{n}.out").read_text().split()[5:] if rc == 0 else []
            kernel = (rc, reasons[n - 1], " ".join(table_out))
            ours = asyncio.run(snap.refusal(table))
            if ours != kernel:
                wrong.append(f"{table}: minidisk {ours}, kernel {kernel}")
    finally:
        logging.disable(logging.NOTSET)
    assert not wrong, "\n".join(wrong)


def test_snapshot_target_versions(formats: Formats) -> None:
    from minidisk.dm.targets import TARGET_TYPES
    kernel = sorted(line.split() for line in
                    (formats.out("snapshot") / "targets").read_text().splitlines()
                    if line.startswith("snapshot"))
    ours = sorted([name, "v{}.{}.{}".format(*TARGET_TYPES[name].version)]
                  for name in ("snapshot", "snapshot-origin", "snapshot-merge"))
    assert ours == kernel


# Integrity (dm_formats_integrity.py)

INTEGRITY = [c.name for c in integ.CONFIGS]


def _integrity(formats: Formats, config: str) -> dict[str, object]:
    prepared = cast(dict[str, dict[str, object]], formats.prepared["integrity"])
    return prepared[config]


def _iconfig(name: str) -> integ.Config:
    return next(c for c in integ.CONFIGS if c.name == name)


def _iout(formats: Formats, name: str) -> Path:
    return formats.out("integrity") / name


def _listing(formats: Formats, what: str) -> dict[str, str]:
    """`dmsetup status` or `table` of every device: name -> its line without the name."""
    lines = _iout(formats, what).read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def _after_device(line: str) -> str:
    """A table line's integrity arguments after the device."""
    return " ".join(line.split()[4:])


def test_integrity_guest_created_every_device(formats: Formats) -> None:
    assert _iout(formats, "create.rc").read_text() == "0\n"


@pytest.mark.parametrize("config", INTEGRITY)
def test_integrity_first_use_as_documented(formats: Formats, config: str) -> None:
    """The kernel's first-use procedure: the one-sector load did what ours did (with 4 KiB
    blocks refused after formatting), and provided_data_sectors from its superblock is
    the one minidisk's first use found on a file of the same size."""
    ours = _integrity(formats, config)
    assert int(_iout(formats, f"{config}.k.create1.rc").read_text()) == ours["create1.rc"]
    dump = integ.parse_dump(_iout(formats, f"{config}.k.dump").read_text())
    assert int(dump["provided_data_sectors"]) == ours["provided"]


@pytest.mark.parametrize("config", INTEGRITY)
def test_integrity_dump_agrees_with_our_superblock(formats: Formats, config: str) -> None:
    """`integritysetup dump` of minidisk's file reads the fields minidisk wrote, and prints
    the same as for the file the kernel formatted."""
    ours = integ.superblock(formats.inputs / "integrity" / "o" / f"{config}.img")
    dump = integ.parse_dump(_iout(formats, f"{config}.o.dump").read_text())
    assert dump == integ.dump_of(ours)
    assert dump == integ.parse_dump(_iout(formats, f"{config}.k.dump").read_text())


@pytest.mark.parametrize("config", INTEGRITY)
def test_integrity_files_are_the_kernels_byte_for_byte(formats: Formats,
                                                       config: str) -> None:
    """Same table, same writes, then unloaded: superblock, journal, tags and data are the
    kernel's. In journal mode the journal is empty on both sides, but where the ring stands
    (its sections' commit sequences) depends on how the writes were grouped into commits
    (here each request is one; the kernel gathers them): it is compared by what replay
    makes of it."""
    ours = (formats.inputs / "integrity" / "o" / f"{config}.img").read_bytes()
    kernel = _iout(formats, f"k/{config}.img").read_bytes()
    sb = integ.superblock(formats.inputs / "integrity" / "o" / f"{config}.img")
    geo = Geometry(sb, 0, len(ours) // 512)
    journal = range(8, geo.initial_sectors) if _iconfig(config).mode == "J" else range(0)
    wrong = [i // 512 for i in range(0, max(len(ours), len(kernel)), 512)
             if i // 512 not in journal and ours[i:i + 512] != kernel[i:i + 512]]
    assert not wrong, f"{config}: sectors {wrong[:20]} differ ({len(wrong)} in all)"
    for image in (ours, kernel):
        plan = plan_replay(geo, image[8 * 512:geo.initial_sectors * 512], "J")
        assert not plan.replay and not plan.clear and not plan.corrupt


@pytest.mark.parametrize("config", INTEGRITY)
def test_integrity_kernel_reads_our_device(formats: Formats, config: str) -> None:
    """dm-integrity, with the same table and through `integritysetup open`, reads what
    minidisk wrote, and reports it as minidisk does."""
    ours = _integrity(formats, config)
    assert _iout(formats, f"{config}.o.regions").read_bytes() == integ.data()
    assert _iout(formats, f"{config}.io.rc").read_text() == "0\n"
    assert _iout(formats, f"{config}.io.head").read_bytes() == integ.data()[:integ.HALF]
    provided = ours["provided"]
    assert _listing(formats, "dmstatus")[f"{config}.o"] == \
        f"0 {provided} integrity {ours['status']}"
    table = _listing(formats, "dmtable")[f"{config}.o"]
    assert table.split()[:3] == ["0", str(provided), "integrity"]
    assert _after_device(table) == " ".join(str(ours["table"]).split()[1:])


@pytest.mark.parametrize("config", INTEGRITY)
def test_integrity_we_read_the_kernels_device(formats: Formats, config: str) -> None:
    status, regions, table = asyncio.run(
        integ.read_file(_iconfig(config), _iout(formats, f"k/{config}.img")))
    assert regions == integ.data()
    kernel = _listing(formats, "dmstatus")[f"{config}.k2"].split(maxsplit=3)[3]
    assert status == kernel
    assert " ".join(table.split()[1:]) == _after_device(
        _listing(formats, "dmtable")[f"{config}.k2"])


def _kernel_failed_blocks(formats: Formats, config: str) -> list[int]:
    """Blocks the kernel's dd read as zeroes (conv=noerror,sync) where data was written."""
    got = _iout(formats, f"{config}.f.read").read_bytes()
    want = integ.data()[:integ.HALF]
    return [b for b in range(integ.HALF // integ.K)
            if got[b * integ.K:(b + 1) * integ.K] != want[b * integ.K:(b + 1) * integ.K]]


@pytest.mark.parametrize("config", INTEGRITY)
def test_integrity_flipped_byte_fails_the_same_block(formats: Formats, config: str) -> None:
    """One byte flipped in a data sector: exactly its 4 KiB block fails, on the kernel
    with EILSEQ, on minidisk with EILSEQ, and both count one mismatch."""
    failed, errnos, status = cast(tuple[list[int], list[int], str],
                                  _integrity(formats, config)["flipped"])
    expected = [integ.FLIP_SECTOR * integ.SECTOR // integ.K]
    assert _kernel_failed_blocks(formats, config) == expected
    assert failed == expected and errnos == [errno.EILSEQ]
    errors = _iout(formats, f"{config}.f.errors").read_text()
    assert errors.count(os.strerror(errno.EILSEQ)) == 1, errors
    kernel_status = _listing(formats, "dmstatus")[f"{config}.f"].split(maxsplit=3)[3]
    assert kernel_status == status
    assert status.split()[0] == "1"


def test_integrity_kernel_replays_our_journal(formats: Formats) -> None:
    """A journal section minidisk committed but had not written back when it was killed:
    6.1 replays it (and so do we)."""
    name = integ.JOURNALED
    want = integ.crash_data() + integ.data()[len(integ.crash_data()):integ.HALF]
    assert _iout(formats, f"{name}.c.head").read_bytes() == want
    assert cast(bytes, _integrity(formats, name)["replayed"])[:integ.HALF] == want
    assert _listing(formats, "dmstatus")[f"{name}.c"].split()[3] == "0"  # no mismatch


@pytest.mark.parametrize("config", INTEGRITY)
def test_integrity_kernels_device_flipped_fails_the_same_block(
        formats: Formats, config: str, tmp_path: Path) -> None:
    image = tmp_path / "kernel.img"
    shutil.copy(_iout(formats, f"k/{config}.img"), image)
    integ.flip(image)
    failed, errnos, status = asyncio.run(integ.flipped_blocks(_iconfig(config), image))
    assert failed == _kernel_failed_blocks(formats, config)
    assert errnos == [errno.EILSEQ] and status.split()[0] == "1"


def _integrity_refusal_reasons(dmesg: str) -> list[str]:
    """The reason 6.1 logged for each of integ.REFUSALS ("" if none), between the
    fragment's own markers."""
    reasons = []
    for part in dmesg.split(integ.REFUSAL_MARK)[1:len(integ.REFUSALS) + 1]:
        found = re.findall(r"device-mapper: table: \d+:\d+: (.*)", part)
        reasons.append(found[-1].strip() if found else "")
    return reasons


def test_integrity_refusals(formats: Formats) -> None:
    """Bad tables and devices are refused with 6.1's reasons and errnos."""
    out = formats.out("integrity") / "refuse"
    reasons = _integrity_refusal_reasons(formats.dmesg("integrity"))
    wrong = []
    for n, line in enumerate(integ.REFUSALS, 1):
        rc = int((out / f"{n}.rc").read_text())
        kernel = (rc, reasons[n - 1])
        ours = asyncio.run(integ.refusal(line))[:2]
        if ours != kernel:
            wrong.append(f"{line}: minidisk {ours}, kernel {kernel}")
    assert not wrong, "\n".join(wrong)


def test_integrity_target_version(formats: Formats) -> None:
    from minidisk.dm.targets import TARGET_TYPES
    kernel = [line.split() for line in
              (formats.out("integrity") / "targets").read_text().splitlines()
              if line.startswith("integrity")]
    assert kernel == [["integrity", "v{}.{}.{}".format(*TARGET_TYPES["integrity"].version)]]


# Crypt (dm_formats_crypt.py)

CRYPT_CASES = [c.name for c in crypt.CASES]


@dataclass
class CryptHost:
    """minidisk's side after the boot: the kernel's file through minidisk's table, the
    input file with the wrong keys, minidisk's tables and its key-message rows."""

    kernels_read: bytes
    wrong_read: bytes
    tables: list[str]
    messages: list[str]


@pytest.fixture(scope="module")
def crypt_host(formats: Formats) -> CryptHost:
    kernels, _, tables, rows = asyncio.run(crypt.host_reads(formats.out("crypt") / "kernel.img"))
    _, wrong, _, _ = asyncio.run(crypt.host_reads(formats.inputs / "crypt" / "ours.img"))
    return CryptHost(kernels, wrong, tables, rows)


def _case(data: bytes, case: str) -> bytes:
    k = CRYPT_CASES.index(case)
    span = crypt.SPAN * crypt.SECTOR
    return data[k * span:(k + 1) * span]


@pytest.mark.parametrize("case", CRYPT_CASES)
def test_crypt_kernel_decrypts_ours(formats: Formats, case: str) -> None:
    """6.1's dm-crypt, same table and key, reads the plaintext minidisk encrypted."""
    kernel = (formats.out("crypt") / "ours.read").read_bytes()
    assert _case(kernel, case) == _case(crypt.data(), case)


@pytest.mark.parametrize("case", CRYPT_CASES)
def test_crypt_ciphertext_is_the_kernels_byte_for_byte(formats: Formats, case: str) -> None:
    ours = _case((formats.inputs / "crypt" / "ours.img").read_bytes(), case)
    kernel = _case((formats.out("crypt") / "kernel.img").read_bytes(), case)
    wrong = [i // crypt.SECTOR for i in range(0, len(ours), crypt.SECTOR)
             if ours[i:i + crypt.SECTOR] != kernel[i:i + crypt.SECTOR]]
    assert not wrong, f"{case}: sectors {wrong[:20]} of {len(ours) // crypt.SECTOR} differ"


@pytest.mark.parametrize("case", CRYPT_CASES)
def test_crypt_we_decrypt_the_kernels(crypt_host: CryptHost, case: str) -> None:
    assert _case(crypt_host.kernels_read, case) == _case(crypt.data(), case)


@pytest.mark.parametrize("case", CRYPT_CASES)
def test_crypt_wrong_key_reads_garbage(formats: Formats, crypt_host: CryptHost,
                                       case: str) -> None:
    """With every key's first byte flipped the kernel reads no sector of the plaintext,
    and the same garbage minidisk reads (decryption is deterministic)."""
    kernel = _case((formats.out("crypt") / "wrong.read").read_bytes(), case)
    plain = _case(crypt.data(), case)
    same = [i // crypt.SECTOR for i in range(0, len(plain), crypt.SECTOR)
            if kernel[i:i + crypt.SECTOR] == plain[i:i + crypt.SECTOR]]
    assert not same, f"{case}: sectors {same[:20]} read as the plaintext with a wrong key"
    assert kernel == _case(crypt_host.wrong_read, case)


def test_crypt_tables_agree(formats: Formats, crypt_host: CryptHost) -> None:
    """`dmsetup table --showkeys`: every segment's cipher, key, offsets and options."""
    kernel = [crypt.normalize(line) for line in
              (formats.out("crypt") / "tables").read_text().splitlines()]
    assert kernel == crypt_host.tables


def test_crypt_key_messages_agree(formats: Formats, crypt_host: CryptHost) -> None:
    """Key messages refused while live; a wipe, then a resume refused (EAGAIN) with the key
    printed as zeroes; a set, then the resume; the exit status of each as 6.1's."""
    kernel = crypt.message_rows((formats.out("crypt") / "messages").read_text())
    assert kernel == crypt_host.messages


def test_crypt_target_version(formats: Formats) -> None:
    from minidisk.dm.targets import TARGET_TYPES
    kernel = [line.split() for line in
              (formats.out("crypt") / "targets").read_text().splitlines()
              if line.startswith("crypt")]
    assert kernel == [["crypt", "v{}.{}.{}".format(*TARGET_TYPES["crypt"].version)]]


# Thin (dm_formats_thin.py): the kernel loads our pool, writes into it, makes its own.

def test_thin_kernel_and_minidisk_read_each_others_pools(formats: Formats,
                                                         tmp_path: Path) -> None:
    prepared = cast(thin.Prepared, formats.prepared["thin"])
    wrong = thin.after_boot(formats.out("thin"), prepared, tmp_path)
    assert not wrong, "\n".join(wrong)
