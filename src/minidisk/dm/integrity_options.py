"""The optional arguments of an integrity table: parsed and checked as 6.1's dm-integrity
constructor does (its error texts), into the `Options` the target and its table line use."""

from __future__ import annotations

from dataclasses import dataclass

from minidisk.dm.integrity_format import MAX_SECTORS_PER_BLOCK
from minidisk.dm.table import SECTOR
from minidisk.dm.target import TargetError

HZ = 250  # Debian's kernels: bitmap_flush_interval is kept in jiffies
DEFAULT_BUFFER_SECTORS = 128
DEFAULT_JOURNAL_WATERMARK = 50
DEFAULT_COMMIT_MS = 10000
DEFAULT_BITMAP_FLUSH_MS = 10000
MAX_FEATURE_ARGS = 17  # 6.1's dm_arg {0, 17}


def _uint(word: str, prefix: str) -> int | None:
    """sscanf(word, "PREFIX%u%c") == 1: the number after `prefix`, else None."""
    if not word.startswith(prefix):
        return None
    rest = word[len(prefix):]
    if not rest.isdigit() or int(rest) > 2**32 - 1:
        return None
    return int(rest)


def _alg_and_key(word: str, error: str) -> tuple[str, str | None, bytes | None]:
    _, _, spec = word.partition(":")
    alg, sep, key_text = spec.partition(":")
    if not sep:
        return alg, None, None
    if len(key_text) % 2:
        raise TargetError(error)
    try:
        return alg, key_text, bytes.fromhex(key_text)
    except ValueError:
        raise TargetError(error) from None


def _msecs_to_jiffies_to_msecs(ms: int) -> int:
    return -(-ms * HZ // 1000) * 1000 // HZ


@dataclass
class Options:
    journal_sectors: int | None = None
    interleave_sectors: int = 32768
    buffer_sectors: int = DEFAULT_BUFFER_SECTORS
    journal_watermark: int = DEFAULT_JOURNAL_WATERMARK
    commit_ms: int = DEFAULT_COMMIT_MS
    sectors_per_block: int = 1
    sectors_per_bit: int | None = None
    bitmap_flush_ms: int = DEFAULT_BITMAP_FLUSH_MS
    hash_alg: str | None = None
    hash_key_text: str | None = None
    hash_key: bytes | None = None
    journal_crypt: str | None = None
    journal_mac: str | None = None
    recalculate: bool = False
    discard: bool = False
    fix_padding: bool = False
    fix_hmac: bool = False
    legacy_recalculate: bool = False
    reset_recalculate: bool = False


def parse_options(words: list[str]) -> Options:
    """The optional arguments of an integrity table (after the mode), as 6.1's ctr reads
    them, with its error texts."""
    if not words[0].isdigit() or int(words[0]) > MAX_FEATURE_ARGS \
            or int(words[0]) > len(words) - 1:
        raise TargetError("Invalid number of feature args")
    opts = words[1:1 + int(words[0])]
    o = Options()
    for word in opts:
        if (v := _uint(word, "journal_sectors:")) is not None:
            o.journal_sectors = v or 1
        elif (v := _uint(word, "interleave_sectors:")) is not None:
            o.interleave_sectors = v
        elif (v := _uint(word, "buffer_sectors:")) is not None:
            o.buffer_sectors = v
        elif (v := _uint(word, "journal_watermark:")) is not None and v <= 100:
            o.journal_watermark = v
        elif (v := _uint(word, "commit_time:")) is not None:
            o.commit_ms = v
        elif word.startswith("meta_device:"):
            raise TargetError("meta_device is not supported by minidisk's integrity")
        elif (v := _uint(word, "block_size:")) is not None:
            if v < SECTOR or v > MAX_SECTORS_PER_BLOCK * SECTOR or v & (v - 1):
                raise TargetError("Invalid block_size argument")
            o.sectors_per_block = v // SECTOR
        elif word.startswith("sectors_per_bit:") and word[16:].isdigit():
            o.sectors_per_bit = int(word[16:])
        elif (v := _uint(word, "bitmap_flush_interval:")) is not None:
            if v >= (2**32 - 1) * 1000 // HZ:
                raise TargetError("Invalid bitmap_flush_interval argument")
            o.bitmap_flush_ms = _msecs_to_jiffies_to_msecs(v)
        elif word.startswith("internal_hash:"):
            o.hash_alg, o.hash_key_text, o.hash_key = _alg_and_key(
                word, "Invalid internal_hash argument")
        elif word.startswith("journal_crypt:"):
            o.journal_crypt = _alg_and_key(word, "Invalid journal_crypt argument")[0]
        elif word.startswith("journal_mac:"):
            o.journal_mac = _alg_and_key(word, "Invalid journal_mac argument")[0]
        elif word == "recalculate":
            o.recalculate = True
        elif word == "reset_recalculate":
            o.recalculate = o.reset_recalculate = True
        elif word == "allow_discards":
            o.discard = True
        elif word == "fix_padding":
            o.fix_padding = True
        elif word == "fix_hmac":
            o.fix_hmac = True
        elif word == "legacy_recalculate":
            o.legacy_recalculate = True
        else:
            raise TargetError("Invalid argument")
    return o
