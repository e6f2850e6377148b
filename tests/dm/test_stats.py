"""dm-stats (dm/stats.py) through the registry's messages, as the kernel's
Documentation/admin-guide/device-mapper/statistics.rst describes them; and libdm's `-S`
selections (dm/selection.py). The battery in tests/vm compares the dmsetup side with 6.1."""

from __future__ import annotations

import errno

import pytest
from tests.dm.dm_helpers import memory_namespace, registry_over, run

from minidisk.dm import Registry
from minidisk.dm.mapped import MappedDevice
from minidisk.dm.selection import SelectionError, matches, parse

KIB = 1024


async def message(reg: Registry, name: str, *words: str) -> str | None:
    return await reg.message(name, 0, list(words))


def counters(line: str) -> list[int]:
    """The 13 counters of one @stats_print line (after `start+step`)."""
    return [int(w) for w in line.split()[1:14]]


async def linear(reg: Registry) -> MappedDevice:
    await reg.create("lin", "0 2048 linear /dev/a 0")
    return reg.get("lin")


def test_no_region_leaves_the_io_methods_as_the_class_has_them() -> None:
    """The fast path's cost is untouched without regions: counting wrappers exist on the
    device only while a region does."""
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        dev = await linear(reg)
        assert "pread" not in vars(dev) and "pwrite" not in vars(dev)
        assert await message(reg, "lin", "@stats_create", "-", "/1") == "0"
        assert {"pread", "pread_sparse", "pwrite", "trim", "zero"} <= set(vars(dev))
        assert await message(reg, "lin", "@stats_delete", "0") is None
        assert not {"pread", "pread_sparse", "pwrite", "trim", "zero"} & set(vars(dev))

    run(go())


def test_counts_reads_writes_sectors_merges_per_area() -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        dev = await linear(reg)
        assert await message(reg, "lin", "@stats_create", "-", "/4") == "0"  # 4 x 512
        assert await message(reg, "lin", "@stats_create", "0+20", "10", "prog") == "1"
        buf = bytearray(4 * KIB)
        for n in range(4):  # sequential: every read after the first continues the last
            await dev.pread(memoryview(buf), n * 4 * KIB)
        for n in range(2):
            await dev.pwrite(memoryview(buf), 64 * KIB + n * 4 * KIB)
        await dev.trim(300 * KIB, 8 * KIB)  # a discard counts as a write, as in Linux
        lines = (await message(reg, "lin", "@stats_print", "0") or "").splitlines()
        assert [line.split()[0] for line in lines] == \
            ["0+512", "512+512", "1024+512", "1536+512"]
        reads, merged, rsect, _, writes, wmerged, wsect = counters(lines[0])[:7]
        assert (reads, merged, rsect, writes, wmerged, wsect) == (4, 3, 32, 2, 1, 16)
        assert counters(lines[1])[4] == 1 and counters(lines[1])[6] == 16  # the trim
        assert counters(lines[0])[8] == 0  # nothing in flight once done
        # a request over two areas of region 1 (sectors 0-10, 10-20) counts in both, with
        # the sectors inside each
        region1 = (await message(reg, "lin", "@stats_print", "1") or "").splitlines()
        assert [counters(line)[:3] for line in region1] == [[2, 1, 10], [2, 2, 10]]
        # a window of areas, and clearing what was printed
        window = await message(reg, "lin", "@stats_print_clear", "0", "1", "2")
        assert [w.split()[0] for w in (window or "").splitlines()] == ["512+512", "1024+512"]
        again = (await message(reg, "lin", "@stats_print", "0") or "").splitlines()
        assert counters(again[1])[4] == 0 and counters(again[0])[0] == 4

    run(go())


def test_list_set_aux_clear_delete_and_ids_reused_lowest_first() -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        await linear(reg)
        create = ("@stats_create", "-", "/3", "2", "precise_timestamps", "histogram:1,5",
                  "prog", "aux")
        assert await message(reg, "lin", *create) == "0"
        assert await message(reg, "lin", "@stats_create", "100+50", "25") == "1"
        assert await message(reg, "lin", "@stats_list") == (
            "0: 0+2048 683 prog aux precise_timestamps histogram:1,5\n"
            "1: 100+50 25 - -\n")
        assert await message(reg, "lin", "@stats_list", "prog") == \
            "0: 0+2048 683 prog aux precise_timestamps histogram:1,5\n"
        assert await message(reg, "lin", "@stats_set_aux", "1", "hello") is None
        assert (await message(reg, "lin", "@stats_list") or "").endswith("1: 100+50 25 - hello\n")
        line = (await message(reg, "lin", "@stats_print", "0") or "").splitlines()[0]
        assert line.endswith(" 0:0:0")  # the histogram's three bins
        assert await message(reg, "lin", "@stats_clear", "0") == ""
        assert await message(reg, "lin", "@stats_delete", "0") is None
        assert await message(reg, "lin", "@STATS_CREATE", "-", "1") == "0"  # any case
        assert [w.split(":")[0] for w in (await message(reg, "lin", "@stats_list") or "")
                .splitlines()] == ["0", "1"]

    run(go())


@pytest.mark.parametrize(("words", "err"), [
    (("@stats_create", "0+0", "1"), errno.EINVAL),  # empty range
    (("@stats_create", "0+100", "0"), errno.EINVAL),  # step 0
    (("@stats_create", "x", "1"), errno.EINVAL),
    (("@stats_create", "-", "/0"), errno.EINVAL),
    (("@stats_create", "-", "1", "1", "histogram:5,5"), errno.EINVAL),  # not increasing
    (("@stats_create", "-", "1", "2", "precise_timestamps"), errno.EINVAL),  # a feature short
    (("@stats_create", "-", "1", "p", "a", "extra"), errno.EINVAL),
    (("@stats_create", "0+1000000000000", "1"), errno.ENOMEM),  # bounded, as the kernel's
    (("@stats_print", "x"), errno.EINVAL),
    (("@stats_print", "0", "1"), errno.EINVAL),
    (("@stats_print", "7"), errno.ENOENT),
    (("@stats_delete", "7"), errno.ENOENT),
    (("@stats_clear", "-1"), errno.EINVAL),
    (("@stats_set_aux", "7", "x"), errno.ENOENT),
    (("@stats_list", "a", "b"), errno.EINVAL),
    (("@stats_nosuch",), errno.EINVAL),
])
def test_refused_messages_with_the_kernels_errno(words: tuple[str, ...], err: int) -> None:
    reg = registry_over(memory_namespace(a=1 << 20))

    async def go() -> None:
        await linear(reg)
        with pytest.raises(OSError) as caught:
            await message(reg, "lin", *words)
        assert caught.value.errno == err

    run(go())


FIELDS = {"name": ("string", lambda r: r["name"]), "open": ("number", lambda r: r["open"])}
ROWS = [{"name": "lin", "open": 1}, {"name": "top", "open": 0}, {"name": "two", "open": 2}]


@pytest.mark.parametrize(("text", "names"), [
    ("name=lin", ["lin"]),
    ("name=~^t && open=0", ["top"]),
    ("name=lin || name=two", ["lin", "two"]),
    ("name=lin # open>1", ["lin", "two"]),
    ("!(name=~^t)", ["lin"]),
    ("(name=lin || name=two) && open>1", ["two"]),
    ("open>=1, name!=two", ["lin"]),
    ("name='top'", ["top"]),
    ("all", ["lin", "top", "two"]),
])
def test_selections_as_libdm_reads_them(text: str, names: list[str]) -> None:
    node = parse(text, FIELDS)
    assert [r["name"] for r in ROWS if matches(node, r)] == names


@pytest.mark.parametrize(("text", "preface", "first"), [
    ("nofield=1", "fields", "Unrecognised selection field: nofield"),
    ("name<>lin", "operators",
     "Operator can be used only with number, size, time or percent fields: name<>lin"),
    ("name?lin", "operators", "Unrecognised comparison operator: ?lin"),
    ("(name=lin", None, "Syntax error: right parenthesis expected at ''"),
    ("!name=lin", None, "Syntax error: left parenthesis expected at 'name=lin'"),
    ("name=z or name=two", None, "Expecting logical operator"),
    ("open=x", None, "Failed to parse numeric value for selection field open."),
])
def test_selection_errors_as_libdm_logs_them(text: str, preface: str | None,
                                             first: str) -> None:
    with pytest.raises(SelectionError) as caught:
        parse(text, FIELDS)
    assert caught.value.preface == preface
    assert caught.value.lines[0] == first
