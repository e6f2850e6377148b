"""A target's TABLE status as data: the constructor arguments `dmsetup table` prints, one
frozen dataclass per target, fields named as the target's document names its arguments
(Documentation/admin-guide/device-mapper/*.rst). `words()` are the arguments as the kernel
prints them back, which `load` accepts again (the table line is `Target.table_args`, made
from these and only from these). Devices are as the kernel prints them: MAJOR:MINOR, or a
namespace key that has no number.

`without_keys()` is the datum as dmsetup shows it without --showkeys: crypt's key and
integrity's internal_hash, journal_crypt and journal_mac keys as zeroes of their length (a
kernel keyring reference, crypt's `:LEN:TYPE:DESC`, names no secret and stays).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from minidisk.dm.status import Status


@dataclass(frozen=True, slots=True)
class NoArgs(Status):
    """zero and error: no arguments."""


@dataclass(frozen=True, slots=True)
class LinearTable(Status):
    """`<dev> <offset>` (linear.rst)."""

    device: str
    offset: int

    def words(self) -> list[str]:
        return [self.device, str(self.offset)]


@dataclass(frozen=True, slots=True)
class Stripe(Status):
    """One stripe of a striped table: `<dev path> <offset>`."""

    device: str
    offset: int

    def words(self) -> list[str]:
        return [self.device, str(self.offset)]


@dataclass(frozen=True, slots=True)
class StripedTable(Status):
    """`<num devs> <chunk size> [<dev path> <offset>]+` (striped.rst)."""

    num_devs: int
    chunk_size: int
    stripes: tuple[Stripe, ...]

    def words(self) -> list[str]:
        return [str(self.num_devs), str(self.chunk_size),
                *(w for s in self.stripes for w in s.words())]


@dataclass(frozen=True, slots=True)
class DelayClassTable(Status):
    """One class of a delay table: `<device> <offset> <delay>` (delay in ms)."""

    device: str
    offset: int
    delay: int

    def words(self) -> list[str]:
        return [self.device, str(self.offset), str(self.delay)]


@dataclass(frozen=True, slots=True)
class DelayTable(Status):
    """`<device> <offset> <delay> [<write_device> <write_offset> <write_delay>
    [<flush_device> <flush_offset> <flush_delay>]]` (delay.rst): `write` and `flush` are
    None when the table gave 3 or 6 arguments (the kernel prints as many back)."""

    read: DelayClassTable
    write: DelayClassTable | None = None
    flush: DelayClassTable | None = None

    def words(self) -> list[str]:
        return [w for c in (self.read, self.write, self.flush) if c is not None
                for w in c.words()]


@dataclass(frozen=True, slots=True)
class CorruptBioByte(Status):
    """flakey's `corrupt_bio_byte <Nth_byte> <direction> <value> <flags>`."""

    nth_byte: int
    direction: str  # r or w
    value: int
    flags: int

    def words(self) -> list[str]:
        return ["corrupt_bio_byte", str(self.nth_byte), self.direction, str(self.value),
                str(self.flags)]


@dataclass(frozen=True, slots=True)
class FlakeyTable(Status):
    """`<dev path> <offset> <up interval> <down interval> <num_features> [<features>]`
    (dm-flakey.rst; 6.1 prints the feature count and ends the line with a space)."""

    device: str
    offset: int
    up_interval: int
    down_interval: int
    drop_writes: bool = False
    error_writes: bool = False
    corrupt_bio_byte: CorruptBioByte | None = None

    def features(self) -> list[str]:
        out = ["drop_writes"] if self.drop_writes else \
            ["error_writes"] if self.error_writes else []
        return out + (self.corrupt_bio_byte.words() if self.corrupt_bio_byte else [])

    def words(self) -> list[str]:
        features = self.features()
        return [self.device, str(self.offset), str(self.up_interval),
                str(self.down_interval), str(len(features)), *features, ""]


@dataclass(frozen=True, slots=True)
class DustTable(Status):
    """`<device_path> <offset> <blksz>` (dm-dust.rst; block size in bytes)."""

    device: str
    offset: int
    blksz: int

    def words(self) -> list[str]:
        return [self.device, str(self.offset), str(self.blksz)]


@dataclass(frozen=True, slots=True)
class LogWritesTable(Status):
    """`<dev_path> <log_dev_path>` (log-writes.rst)."""

    device: str
    log_device: str

    def words(self) -> list[str]:
        return [self.device, self.log_device]


@dataclass(frozen=True, slots=True)
class SnapshotOriginTable(Status):
    """`<origin>` (snapshot.rst)."""

    origin: str

    def words(self) -> list[str]:
        return [self.origin]


@dataclass(frozen=True, slots=True)
class SnapshotTable(Status):
    """snapshot and snapshot-merge: `<origin> <COW device> <persistent?> <chunksize>
    [<# feature args> [<arg>]*]` (snapshot.rst; persistent is P, PO or N)."""

    origin: str
    cow_device: str
    persistent: str
    chunksize: int
    features: tuple[str, ...] = ()

    def words(self) -> list[str]:
        out = [self.origin, self.cow_device, self.persistent, str(self.chunksize)]
        return out + ([str(len(self.features)), *self.features] if self.features else [])


@dataclass(frozen=True, slots=True)
class ThinPoolTable(Status):
    """`<metadata dev> <data dev> <data block size (sectors)> <low water mark (blocks)>
    <number of feature args> [<arg>]*` (thin-provisioning.rst)."""

    metadata_dev: str
    data_dev: str
    data_block_size: int
    low_water_mark: int
    features: tuple[str, ...] = ()

    def words(self) -> list[str]:
        return [self.metadata_dev, self.data_dev, str(self.data_block_size),
                str(self.low_water_mark), str(len(self.features)), *self.features]


@dataclass(frozen=True, slots=True)
class ThinTable(Status):
    """`<pool dev> <dev id> [<external origin dev>]` (thin-provisioning.rst)."""

    pool_dev: str
    dev_id: int
    external_origin_dev: str | None = None

    def words(self) -> list[str]:
        out = [self.pool_dev, str(self.dev_id)]
        return out + [self.external_origin_dev] if self.external_origin_dev else out


def _zeroes(text: str) -> str:
    return "0" * len(text)


@dataclass(frozen=True, slots=True)
class CryptTable(Status):
    """`<cipher> <key> <iv_offset> <device path> <offset> [<#opt_params> <opt_params>]`
    (dm-crypt.rst)."""

    cipher: str
    key: str
    iv_offset: int
    device: str
    offset: int
    opt_params: tuple[str, ...] = ()

    def words(self) -> list[str]:
        out = [self.cipher, self.key, str(self.iv_offset), self.device, str(self.offset)]
        return out + ([str(len(self.opt_params)), *self.opt_params] if self.opt_params else [])

    def without_keys(self) -> CryptTable:
        return self if self.key.startswith(":") else replace(self, key=_zeroes(self.key))


# The integrity arguments whose value may end in `:KEY` (hex), which dmsetup hides.
_KEYED = ("internal_hash", "journal_crypt", "journal_mac")


@dataclass(frozen=True, slots=True)
class IntegrityTable(Status):
    """`<device> <offset> <tag size> <mode> <#additional args> <additional args>`
    (dm-integrity.rst; each additional argument as the kernel prints it, `name:value` or a
    bare flag, in the kernel's order)."""

    device: str
    offset: int
    tag_size: int
    mode: str  # J, D, B or R
    additional_args: tuple[str, ...] = ()

    def words(self) -> list[str]:
        return [self.device, str(self.offset), str(self.tag_size), self.mode,
                str(len(self.additional_args)), *self.additional_args]

    def without_keys(self) -> IntegrityTable:
        def hidden(arg: str) -> str:
            name, _, value = arg.partition(":")
            algorithm, colon, key = value.partition(":")
            if name not in _KEYED or not colon:
                return arg
            return f"{name}:{algorithm}:{_zeroes(key)}"
        return replace(self, additional_args=tuple(hidden(a) for a in self.additional_args))


def without_keys(data: Status) -> Status:
    """`data` as dmsetup shows it without --showkeys (only crypt and integrity hide any)."""
    if isinstance(data, CryptTable | IntegrityTable):
        return data.without_keys()
    return data
