"""The six VMS/Linux lock modes and which of them may be granted together.

Numbering and matrix follow Linux (`include/uapi/linux/dlmconstants.h`, `fs/dlm/lock.c`
`__dlm_compat_matrix`, itself quoting "VAXcluster Principles" ch. 6). The numeric order is the
strength order Linux uses for "higher mode" comparisons (up/down conversion, the highest mode a
blocking notification carries), even though CW and PR are not comparable as sets of rights.
"""

from __future__ import annotations

import enum


class Mode(enum.IntEnum):
    """A lock mode, weakest first."""

    NL = 0  # null: holds a place, keeps the resource and its value block alive
    CR = 1  # concurrent read
    CW = 2  # concurrent write
    PR = 3  # protected read (shared)
    PW = 4  # protected write (update lock: still admits CR readers)
    EX = 5  # exclusive

    @classmethod
    def parse(cls, text: str | int | Mode) -> Mode:
        """Accept `Mode`, its number, or its name in any case ("ex", "EX", "exmode")."""
        if isinstance(text, int):
            return cls(text)
        name = text.strip().upper().removesuffix("MODE")
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown lock mode {text!r} (NL CR CW PR PW EX)") from None


# COMPATIBLE[a][b] is True when a lock in mode a and a lock in mode b may be granted together.
_ROWS = (
    # NL CR CW PR PW EX
    "111111",  # NL
    "111110",  # CR
    "111000",  # CW
    "110100",  # PR
    "110000",  # PW
    "100000",  # EX
)
COMPATIBLE: tuple[tuple[bool, ...], ...] = tuple(
    tuple(bit == "1" for bit in row) for row in _ROWS
)


def compatible(a: Mode, b: Mode) -> bool:
    """True when locks in modes `a` and `b` may be granted at the same time."""
    return COMPATIBLE[a][b]


class LvbAction(enum.Enum):
    """What happens to the lock value block when a lock moves between two modes."""

    NONE = "none"
    READ = "read"    # the resource's value block is copied to the holder
    WRITE = "write"  # the holder's copy (if it gave one) is stored in the resource


def lvb_action(granted: Mode | None, requested: Mode) -> LvbAction:
    """Linux `dlm_lvb_operations`: read on every new grant and up-conversion; write only when
    a PW or EX lock converts (down, or PW/EX to itself); nothing for other down-conversions.

    `granted` is None for a new request.
    """
    if granted is None or granted == Mode.NL:
        return LvbAction.READ
    if granted >= Mode.PW:
        if granted == Mode.PW and requested == Mode.EX:
            return LvbAction.READ
        return LvbAction.WRITE
    return LvbAction.READ if requested >= granted else LvbAction.NONE
