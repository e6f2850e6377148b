"""A target's status as data (the kernel's status_type_t): what `dmsetup status` (INFO) and
`dmsetup table` (TABLE) print, as frozen dataclasses whose fields the kernel's documentation
names (Documentation/admin-guide/device-mapper/*.rst, or the status function of
drivers/md/dm-*.c where the document names none), in the order the kernel prints them.

Each target returns its INFO data from `status_info()` and its TABLE data from
`status_table()` (dm/status_table.py); its status text and table arguments are made from that
data here and nowhere else (`Target.status`, `Target.table_args`), so that text and data
cannot disagree. Where the kernel prints one word instead of the fields (a snapshot's
`Invalid`, a pool's `Fail`), `state` holds that word and the fields are None.

`SegmentStatus.as_json` is the one JSON shape of a segment's data, `dmsetup status --json`
and `table --json` alike (README, "dmsetup status --json").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, NamedTuple


class StatusType(StrEnum):
    """STATUSTYPE_INFO (`dmsetup status`) and STATUSTYPE_TABLE (`dmsetup table`)."""

    INFO = "info"
    TABLE = "table"


@dataclass(frozen=True, slots=True)
class Status:
    """Base of every status datum: the words the kernel prints, and the JSON of the fields."""

    def words(self) -> list[str]:
        """The status text's words (an empty last word keeps the kernel's trailing space)."""
        return []

    def text(self) -> str:
        return " ".join(self.words())

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class SegmentStatus(NamedTuple):
    """One segment's status: where it lies (sectors), its target type and its data."""

    start: int
    length: int
    target_type: str
    data: Status

    def as_json(self) -> dict[str, Any]:
        """The segment in `status --json` and `table --json` (the one JSON shape)."""
        return {"start": self.start, "length": self.length, "target_type": self.target_type,
                "status": self.data.as_json()}


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


# INFO status, one per target that prints something. linear, zero, error, flakey,
# snapshot-origin and crypt print nothing: `NoStatus`.


@dataclass(frozen=True, slots=True)
class NoStatus(Status):
    """The targets whose INFO status is empty."""


@dataclass(frozen=True, slots=True)
class StripedStatus(Status):
    """`<#stripes> <dev>... 1 <A|D per stripe>` (dm-stripe.c): 'D' once a stripe saw an
    error. `health` holds one letter per stripe, in table order."""

    stripes: int
    devices: tuple[str, ...]
    health: str

    def words(self) -> list[str]:
        return [str(self.stripes), *self.devices, "1", self.health]


@dataclass(frozen=True, slots=True)
class DelayStatus(Status):
    """`<reads> <writes> <flushes>` held now (dm-delay.c's read, write and flush `ops`)."""

    read_ops: int
    write_ops: int
    flush_ops: int

    def words(self) -> list[str]:
        return [str(self.read_ops), str(self.write_ops), str(self.flush_ops)]


@dataclass(frozen=True, slots=True)
class DustStatus(Status):
    """`<device> fail_read_on_bad_block|bypass quiet|verbose` (dm-dust.rst)."""

    device: str
    fail_read_on_bad_block: bool
    quiet: bool

    def words(self) -> list[str]:
        return [self.device, "fail_read_on_bad_block" if self.fail_read_on_bad_block
                else "bypass", "quiet" if self.quiet else "verbose"]


@dataclass(frozen=True, slots=True)
class LogWritesStatus(Status):
    """`<#logged entries> <highest allocated sector>` (log-writes.rst)."""

    logged_entries: int
    highest_allocated_sector: int

    def words(self) -> list[str]:
        return [str(self.logged_entries), str(self.highest_allocated_sector)]


@dataclass(frozen=True, slots=True)
class SnapshotStatus(Status):
    """snapshot and snapshot-merge: `<sectors_allocated>/<total_sectors> <metadata_sectors>`
    (snapshot.rst), or `state` Invalid, Merge failed or Overflow instead."""

    state: str | None
    sectors_allocated: int | None = None
    total_sectors: int | None = None
    metadata_sectors: int | None = None

    def words(self) -> list[str]:
        if self.state is not None:
            return [self.state]
        return [f"{self.sectors_allocated}/{self.total_sectors}", str(self.metadata_sectors)]


@dataclass(frozen=True, slots=True)
class ThinPoolStatus(Status):
    """`<transaction id> <used metadata blocks>/<total metadata blocks> <used data
    blocks>/<total data blocks> <held metadata root> ro|rw|out_of_data_space
    ignore_discard|[no_]discard_passdown error|queue_if_no_space needs_check|-
    <metadata_low_watermark> ` (thin-provisioning.rst; 6.1 ends it with a space), or `state`
    Fail or Error instead. A held root of None prints as '-'."""

    state: str | None
    transaction_id: int | None = None
    used_metadata_blocks: int | None = None
    total_metadata_blocks: int | None = None
    used_data_blocks: int | None = None
    total_data_blocks: int | None = None
    held_metadata_root: int | None = None
    mode: str | None = None  # rw, ro or out_of_data_space
    discards: str | None = None  # ignore_discard, discard_passdown or no_discard_passdown
    no_space: str | None = None  # error_if_no_space or queue_if_no_space
    needs_check: bool | None = None
    metadata_low_watermark: int | None = None

    def words(self) -> list[str]:
        if self.state is not None:
            return [self.state]
        return [str(self.transaction_id),
                f"{self.used_metadata_blocks}/{self.total_metadata_blocks}",
                f"{self.used_data_blocks}/{self.total_data_blocks}",
                _dash(self.held_metadata_root), str(self.mode), str(self.discards),
                str(self.no_space), "needs_check" if self.needs_check else "-",
                str(self.metadata_low_watermark), ""]


@dataclass(frozen=True, slots=True)
class ThinStatus(Status):
    """`<nr mapped sectors> <highest mapped sector>` (thin-provisioning.rst; '-', None
    here, when nothing is mapped), or `state` Fail instead."""

    state: str | None
    nr_mapped_sectors: int | None = None
    highest_mapped_sector: int | None = None

    def words(self) -> list[str]:
        if self.state is not None:
            return [self.state]
        return [str(self.nr_mapped_sectors), _dash(self.highest_mapped_sector)]


@dataclass(frozen=True, slots=True)
class IntegrityStatus(Status):
    """`<#integrity mismatches> <provided data sectors> <recalculating position|->`
    (dm-integrity.rst's status line; None while not recalculating)."""

    integrity_mismatches: int
    provided_data_sectors: int
    recalculating_position: int | None

    def words(self) -> list[str]:
        return [str(self.integrity_mismatches), str(self.provided_data_sectors),
                _dash(self.recalculating_position)]
