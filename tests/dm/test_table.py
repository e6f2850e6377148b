"""Table text: splitting with backslash escapes, layout rules, one-line errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidisk.dm.table import (
    TableError,
    format_args,
    format_line,
    parse_line,
    parse_table,
    split_args,
)


def test_backslash_escapes_the_next_character() -> None:
    assert split_args(r"a\ b  c\\d \\") == ["a b", "c\\d", "\\"]
    assert split_args("  x\ty\n") == ["x", "y"]


def test_trailing_backslash_is_an_error() -> None:
    with pytest.raises(TableError, match="escapes nothing"):
        split_args("abc\\")


@given(st.lists(st.text(min_size=1), max_size=6))
def test_formatted_args_split_back_unchanged(args: list[str]) -> None:
    assert split_args(format_args(args)) == args


@given(st.integers(0, 2**40), st.integers(1, 2**40),
       st.from_regex(r"[a-z][a-z\-]{0,12}", fullmatch=True),
       st.lists(st.text(min_size=1), max_size=5))
def test_lines_round_trip(start: int, length: int, target: str, args: list[str]) -> None:
    seg = parse_line(format_line(start, length, target, args), 1)
    assert (seg.start, seg.length, seg.target, list(seg.args)) == (start, length, target, args)


def test_comments_and_blank_lines_are_skipped_but_lines_keep_their_numbers() -> None:
    table = "# a comment\n\n0 10 zero\n10 5 error\n"
    segs = parse_table(table)
    assert [(s.start, s.length, s.target, s.line) for s in segs] == \
        [(0, 10, "zero", 3), (10, 5, "error", 4)]
    assert segs[0].format() == "0 10 zero "


@pytest.mark.parametrize("table,line,reason", [
    ("0 10 zero\n20 5 zero\n", 2, "gap in table: starts at sector 20, previous ends at 10"),
    ("0 10 zero\n5 5 zero\n", 2, "overlaps the previous segment"),
    ("0 10 zero\n10 0 zero\n", 2, "zero-length segment"),
    ("5 10 zero\n", 1, "first segment must start at sector 0"),
    ("0 -1 zero\n", 1, "invalid length '-1'"),
    ("0 10k zero\n", 1, "invalid length '10k'"),
    ("0x0 10 zero\n", 1, "invalid start '0x0'"),
    ("0 10\n", 1, "a segment needs <start> <length> <target>"),
])
def test_layout_errors_name_the_line_and_say_why(table: str, line: int, reason: str) -> None:
    with pytest.raises(TableError) as info:
        parse_table(table)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"line {line} (")
    assert reason in message
    assert info.value.line == line
