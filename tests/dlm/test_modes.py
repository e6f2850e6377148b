"""The compatibility matrix, all 36 pairs, against the table in research/dlm.md §1.1, and the
value-block rules against Linux's `dlm_lvb_operations`."""

from __future__ import annotations

import itertools

import pytest

from minidisk.dlm.modes import LvbAction, Mode, compatible, lvb_action

# Written as the set of pairs that may NOT be granted together, so a typo in the source's
# bit strings cannot be copied here by accident.
INCOMPATIBLE = {
    ("CR", "EX"),
    ("CW", "PR"), ("CW", "PW"), ("CW", "EX"),
    ("PR", "CW"), ("PR", "PW"), ("PR", "EX"),
    ("PW", "CW"), ("PW", "PR"), ("PW", "PW"), ("PW", "EX"),
    ("EX", "CR"), ("EX", "CW"), ("EX", "PR"), ("EX", "PW"), ("EX", "EX"),
}


@pytest.mark.parametrize(("a", "b"), list(itertools.product(Mode, Mode)),
                         ids=lambda m: m.name)
def test_compatibility_matrix(a: Mode, b: Mode) -> None:
    assert compatible(a, b) == ((a.name, b.name) not in INCOMPATIBLE)
    assert compatible(a, b) == compatible(b, a)


def test_numbering_and_parse() -> None:
    assert [m.name for m in sorted(Mode)] == ["NL", "CR", "CW", "PR", "PW", "EX"]
    assert [int(m) for m in sorted(Mode)] == [0, 1, 2, 3, 4, 5]
    assert Mode.parse("ex") is Mode.EX
    assert Mode.parse("PRMODE") is Mode.PR
    assert Mode.parse(2) is Mode.CW
    with pytest.raises(ValueError):
        Mode.parse("XX")


# Linux fs/dlm/lock.c dlm_lvb_operations, rows = granted (None = new), columns NL..EX:
# 1 read, 0 write, -1 nothing.
LINUX_LVB_OPS = {
    None: [1, 1, 1, 1, 1, 1],
    Mode.NL: [1, 1, 1, 1, 1, 1],
    Mode.CR: [-1, 1, 1, 1, 1, 1],
    Mode.CW: [-1, -1, 1, 1, 1, 1],
    Mode.PR: [-1, -1, -1, 1, 1, 1],
    Mode.PW: [0, 0, 0, 0, 0, 1],
    Mode.EX: [0, 0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("granted", list(LINUX_LVB_OPS), ids=str)
def test_lvb_actions(granted: Mode | None) -> None:
    expect = {1: LvbAction.READ, 0: LvbAction.WRITE, -1: LvbAction.NONE}
    for requested, code in zip(sorted(Mode), LINUX_LVB_OPS[granted], strict=True):
        assert lvb_action(granted, requested) is expect[code], (granted, requested)
