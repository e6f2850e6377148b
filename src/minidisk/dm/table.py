"""Device-mapper tables as text: parse, check the layout, format.

A table is one segment per line, in dmsetup's syntax::

    <start> <length> <target> <args...>

with `start` and `length` in 512-byte sectors. Arguments split on whitespace and a backslash
makes the next character literal (the kernel's `dm_split_args`), so a device key or a mark
containing a space can be written `my\\ disk`. Empty lines and lines starting with `#` are
skipped, as dmsetup does when it reads a table file.

This module is pure: it knows nothing about targets or devices. The load rules that need
them (argument counts, device sizes, singleton targets) are checked when a table is built
(`mapping.py`); the layout rules that need only numbers are checked here. Every error is a
`TableError`, one line that names the segment and says why.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SECTOR = 512

# What must be escaped so that `format_args` output splits back into the same arguments.
_NEEDS_ESCAPE = re.compile(r"([\\\s])")


class TableError(ValueError):
    """A table the kernel's load rules reject. `str()` is one line naming the segment."""

    def __init__(self, reason: str, line: int | None = None, text: str | None = None,
                 err: int = errno.EINVAL) -> None:
        self.reason = reason
        self.errno = err  # what the ioctl fails with: EINVAL, or ENODEV for a missing device
        self.line = line
        self.text = text
        where = ""
        if line is not None:
            where = f"line {line}"
            if text is not None:
                where += f" ({text.strip()!r})"
            where += ": "
        super().__init__(f"{where}{reason}")


@dataclass(frozen=True, slots=True)
class Segment:
    """One table line: `length` sectors from `start`, mapped by `target` with `args`."""

    start: int
    length: int
    target: str
    args: tuple[str, ...]
    line: int = 0  # 1-based line number in the text it came from (0: built in code)

    @property
    def end(self) -> int:
        return self.start + self.length

    def format(self) -> str:
        return format_line(self.start, self.length, self.target, self.args)

    def error(self, reason: str, err: int = errno.EINVAL) -> TableError:
        """A TableError that names this segment."""
        return TableError(reason, self.line or None, self.format(), err)


def split_args(text: str) -> list[str]:
    """Split on whitespace; a backslash makes the next character part of the word."""
    words: list[str] = []
    word: list[str] = []
    in_word = False
    chars = iter(text)
    for c in chars:
        if c == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise TableError("backslash at end of line escapes nothing")
            word.append(nxt)
            in_word = True
        elif c.isspace():
            if in_word:
                words.append("".join(word))
                word.clear()
                in_word = False
        else:
            word.append(c)
            in_word = True
    if in_word:
        words.append("".join(word))
    return words


def escape_arg(arg: str) -> str:
    return _NEEDS_ESCAPE.sub(r"\\\1", arg)


def format_args(args: Iterable[str]) -> str:
    return " ".join(escape_arg(a) for a in args)


def format_line(start: int, length: int, target: str, args: Iterable[str]) -> str:
    """One table line; targets with no arguments keep dmsetup's trailing space."""
    return f"{start} {length} {target} {format_args(args)}"


def _sector_number(word: str, what: str, line: int, text: str) -> int:
    if not word.isdigit():  # the kernel's sscanf("%llu%c") refuses signs and suffixes
        raise TableError(f"invalid {what} {word!r}: not a sector count", line, text)
    return int(word)


def parse_line(text: str, line: int = 0) -> Segment:
    try:
        words = split_args(text)
    except TableError as e:
        raise TableError(e.reason, line, text) from None
    if len(words) < 3:
        raise TableError("a segment needs <start> <length> <target> [args]", line, text)
    start = _sector_number(words[0], "start", line, text)
    length = _sector_number(words[1], "length", line, text)
    return Segment(start, length, words[2], tuple(words[3:]), line)


def parse_table(text: str) -> list[Segment]:
    """Parse and check the layout (`check_layout`) of a whole table."""
    segments = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        segments.append(parse_line(stripped, number))
    check_layout(segments)
    return segments


def check_layout(segments: Sequence[Segment]) -> None:
    """The kernel's `dm_table_add_target`/`adjoin` rules: from 0, contiguous, no empty segment."""
    expected = 0
    for seg in segments:
        if seg.length == 0:
            raise seg.error("zero-length segment")
        if seg.start < expected:
            raise seg.error(
                f"overlaps the previous segment: starts at sector {seg.start}, "
                f"previous ends at {expected}")
        if seg.start > expected:
            if expected == 0:
                raise seg.error(f"first segment must start at sector 0, not {seg.start}")
            raise seg.error(
                f"gap in table: starts at sector {seg.start}, previous ends at {expected}")
        expected = seg.end


def format_table(lines: Iterable[tuple[int, int, str, Sequence[str]]]) -> str:
    return "".join(format_line(*line) + "\n" for line in lines)
