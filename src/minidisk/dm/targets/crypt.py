"""`crypt <cipher> <key> <iv_offset> <dev> <offset> [<#opt_params> <opt_params>...]`, as
Linux 6.1 has it (dm-crypt 1.24.0, DOC/dm-crypt.rst and MD/dm-crypt.c of that release).

Ciphers, in dm-crypt's two spellings (`cipher[:keycount]-chainmode-ivmode[:ivopts]` and
`capi:chainmode(cipher)-ivmode[:ivopts]`): AES in XTS, CBC or ECB with the IV generators
plain, plain64, plain64be, essiv:HASH, benbi, eboiv (CBC) and null, e.g. aes-xts-plain64,
aes-cbc-essiv:sha256, aes-cbc-plain, capi:xts(aes)-plain64. The table's key is hex (its
length gives the key size: 32, 48 or 64 bytes for XTS, 16, 24 or 32 for CBC and ECB; an
odd last digit is ignored, as the kernel's hex2bin of `len // 2` bytes ignores it). What
6.1 accepts but minidisk does not do is refused with a message that names it: keyring
keys (`:LEN:logon:DESC`, `:LEN:user:DESC`, which need the kernel's keyring), a keycount
above 1, other ciphers and IV generators (lmk, tcw, elephant, random, eboiv over XTS) and
`integrity:` (authenticated crypt, which needs dm-integrity's tags below).

Each encryption unit (`sector_size`, 512 bytes unless the option says 4096 or another power
of two) is encrypted on its own with an IV from its sector number, counted as the kernel
counts it: in 512-byte sectors from the target's start plus `iv_offset` (so a 4 KiB unit's
IV steps by 8), or in units with `iv_large_sectors`. A request must be aligned to the unit,
as the kernel kills a bio that is not (EIO).

The cipher work is whole requests, never a Python loop over bytes or blocks: XTS is ECB
under the first key between two XORs with the tweak of every block, and the tweaks are the
encrypted IVs (one ECB call under the second key for all units) multiplied by alpha once per
block position, over all units at once as one Python integer of 128-bit lanes (`_tweaks`).
CBC decryption is one ECB call and one XOR with the ciphertext shifted a block (the IVs in
front of each unit); CBC encryption is chained, so it is one call per unit. ESSIV is one ECB
call over the IVs under the key's hash, EBOIV one under the key itself. The ECB contexts
live as long as the key: ECB keeps no state between calls.

Messages `key set <hexkey>` and `key wipe`, only while suspended (refused while live, as 6.1
refuses them); after a wipe a resume fails with EAGAIN until a key is set. Status (INFO) is
empty; the table prints the key as hex (all zeroes after a wipe, as 6.1's does).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from minidisk.device.api import MAX_REQUEST, BlockSize, Caps
from minidisk.dm.status_table import CryptTable
from minidisk.dm.table import SECTOR
from minidisk.dm.target import DeviceRef, Target, TargetContext, TargetError

BLOCK = 16  # AES's block, and every IV's size here
CHUNK = 1 << 20  # bytes of a request converted per call: bounds the integers and buffers
MAX_FEATURE_ARGS = 8  # 6.1's dm_arg for the optional parameter count
# IV generators that 6.1 has and minidisk does not: refused with a message naming them.
_KERNEL_ONLY_IVS = {"elephant", "lmk", "tcw", "random"}
_IV_MODES = {"plain", "plain64", "plain64be", "essiv", "null", "benbi", "eboiv"}
_CHAINS = {"xts", "cbc", "ecb"}
# ESSIV's hash by the kernel's name: hashlib's name. The salt keys AES, so only digests of
# 16, 24 or 32 bytes load (others fail as the kernel's setkey fails them).
_ESSIV_HASHES = {"md5": "md5", "sha1": "sha1", "sha224": "sha224", "sha256": "sha256",
                 "sha384": "sha384", "sha512": "sha512", "sha3-224": "sha3_224",
                 "sha3-256": "sha3_256", "sha3-384": "sha3_384", "sha3-512": "sha3_512"}
_HEX = re.compile(r"[0-9a-fA-F]*")


def _ecb(key: bytes, decrypt: bool = False) -> CipherContext:
    cipher = Cipher(algorithms.AES(key), modes.ECB())
    return cipher.decryptor() if decrypt else cipher.encryptor()


def _xor(a: bytes | bytearray | memoryview, b: int) -> bytes:
    """`a` XOR the little-endian integer `b`, as bytes of a's length: CPython's big integers
    XOR a buffer in C, which is what makes the per-block tweaks cheap."""
    return (int.from_bytes(a, "little") ^ b).to_bytes(len(a), "little")


@lru_cache(maxsize=32)
def _lanes(n: int) -> tuple[int, int]:
    """Masks over n 128-bit lanes: the top bit of every lane, and every other bit."""
    unit = ((1 << (128 * n)) - 1) // ((1 << 128) - 1)  # bit 0 of every lane
    top = unit << 127
    return top, ((1 << (128 * n)) - 1) ^ top


def _tweaks(first: bytes, per_unit: int) -> int:
    """XTS's tweak of every block of n units, as one integer of the whole request's length.

    `first` is the n encrypted IVs (the tweaks of each unit's block 0). Block i's tweak is
    block i-1's times alpha in GF(2^128), IEEE 1619's little-endian doubling: shift left one
    bit, and XOR 0x87 into the low byte when bit 127 falls off. Done for all n units at
    once on one integer of n lanes, and each step's lanes are copied to their places (every
    unit's block i) with strided memoryview copies of 8-byte halves.
    """
    n = len(first) // BLOCK
    top, rest = _lanes(n)
    out = bytearray(n * per_unit * BLOCK)
    words = memoryview(out).cast("Q")
    stride = 2 * per_unit  # 8-byte words from one unit's block i to the next unit's
    lane = int.from_bytes(first, "little")
    for i in range(per_unit):
        if i:
            carry = (lane & top) >> 127  # bit 0 of each lane whose bit 127 was set
            lane = ((lane & rest) << 1) ^ (carry * 0x87)  # no carries: 0x87 fits a lane
        step = memoryview(lane.to_bytes(n * BLOCK, "little")).cast("Q")
        words[2 * i::stride] = step[0::2]
        words[2 * i + 1::stride] = step[1::2]
    return int.from_bytes(out, "little")


@lru_cache(maxsize=32)
def _iv_struct(n: int, big_endian: bool) -> struct.Struct:
    # plain64 (and essiv's input): le64 then eight zero bytes; plain64be: zeroes, then be64
    return struct.Struct(">" + "8xQ" * n if big_endian else "<" + "Q8x" * n)


class _Chain(Protocol):
    def encrypt(self, data: memoryview, ivs: bytes, unit: int) -> bytes: ...

    def decrypt(self, data: memoryview, ivs: bytes, unit: int) -> bytes: ...


class _XTS:
    def __init__(self, key: bytes) -> None:
        half = len(key) // 2
        # Two long-lived ECB contexts under the data key and one under the tweak key: XTS
        # with equal halves is allowed, as 6.1's xts(aes) allows it outside FIPS mode.
        self.data_enc = _ecb(key[:half])
        self.data_dec = _ecb(key[:half], decrypt=True)
        self.tweak_enc = _ecb(key[half:])

    def _tweaks(self, ivs: bytes, unit: int) -> int:
        return _tweaks(self.tweak_enc.update(ivs), unit // BLOCK)

    def encrypt(self, data: memoryview, ivs: bytes, unit: int) -> bytes:
        tweaks = self._tweaks(ivs, unit)
        return _xor(self.data_enc.update(_xor(data, tweaks)), tweaks)

    def decrypt(self, data: memoryview, ivs: bytes, unit: int) -> bytes:
        tweaks = self._tweaks(ivs, unit)
        return _xor(self.data_dec.update(_xor(data, tweaks)), tweaks)


class _CBC:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.algorithm = algorithms.AES(key)
        self.dec = _ecb(key, decrypt=True)

    def encrypt(self, data: memoryview, ivs: bytes, unit: int) -> bytes:
        # Each block depends on the one before it: one CBC context per unit.
        alg = self.algorithm
        return b"".join(
            Cipher(alg, modes.CBC(ivs[j:j + BLOCK])).encryptor().update(data[pos:pos + unit])
            for j, pos in zip(range(0, len(ivs), BLOCK), range(0, len(data), unit),
                              strict=True))

    def decrypt(self, data: memoryview, ivs: bytes, unit: int) -> bytes:
        # P[i] = D(C[i]) ^ C[i-1], with each unit's IV as its C[-1].
        previous = bytearray(len(data))
        previous[BLOCK:] = data[:-BLOCK]
        words = memoryview(previous).cast("Q")
        iv_words = memoryview(ivs).cast("Q")
        stride = unit // 8
        words[0::stride] = iv_words[0::2]
        words[1::stride] = iv_words[1::2]
        return _xor(self.dec.update(data), int.from_bytes(previous, "little"))


class _ECB:
    def __init__(self, key: bytes) -> None:
        self.enc = _ecb(key)
        self.dec = _ecb(key, decrypt=True)

    def encrypt(self, data: memoryview, ivs: bytes, unit: int) -> bytes:
        return self.enc.update(data)

    def decrypt(self, data: memoryview, ivs: bytes, unit: int) -> bytes:
        return self.dec.update(data)


_CHAIN_TYPES: dict[str, type[_XTS] | type[_CBC] | type[_ECB]] = {
    "xts": _XTS, "cbc": _CBC, "ecb": _ECB}
_KEY_SIZES = {"xts": (32, 48, 64), "cbc": (16, 24, 32), "ecb": (16, 24, 32)}


@dataclass(frozen=True, slots=True)
class CipherSpec:
    """The table's first argument, parsed as 6.1 parses it."""

    text: str  # as given: the table prints it back
    chain: str  # xts, cbc or ecb
    iv_mode: str | None  # None: no IV (ecb)
    iv_opts: str | None  # essiv's hash


def parse_cipher(text: str) -> CipherSpec:
    """crypt_ctr_cipher_new/_old and crypt_ctr_ivmode: the kernel's messages for what it
    refuses, ours (naming the token) for what it accepts and minidisk does not do."""
    if text.startswith("capi:"):
        rest = text[len("capi:"):]
        iv_opts: str | None = None
        iv_mode: str | None = None
        if ":" in rest:
            rest, iv_opts = rest.rsplit(":", 1)
        if "-" in rest:
            rest, iv_mode = rest.rsplit("-", 1)
        match = re.fullmatch(r"(\w+)\((\w+)\)", rest)
        if match is None or match[1] not in _CHAINS or match[2] != "aes":
            raise TargetError(f"cipher {rest!r} is not supported by minidisk "
                              "(xts(aes), cbc(aes) and ecb(aes) are)")
        chain = match[1]
        if iv_mode is None and chain != "ecb":
            # 6.1 takes it and leaves the IV unset (whatever its request buffer held)
            raise TargetError(f"cipher {text!r} names no IV mode: minidisk needs one")
        return _check_iv(CipherSpec(text, chain, iv_mode, iv_opts))
    if "(" in text:
        raise TargetError("Bad cipher specification")
    head, dash, tail = text.partition("-")
    cipher, colon, keycount = head.partition(":")
    if colon:
        if not keycount.isdigit() or int(keycount) & (int(keycount) - 1) \
                or int(keycount) == 0 or int(keycount) >= 2**32:
            raise TargetError("Bad cipher key count specification")
        if int(keycount) != 1:
            raise TargetError(f"key count {keycount} (multi-key mode) is not supported by "
                              "minidisk")
    parts = tail.split("-", 1) if dash else []  # "aes-" has an empty chain mode
    chain_word: str | None = parts[0] if parts else None
    iv_part = parts[1] if len(parts) > 1 else None
    mode, _, opts = iv_part.partition(":") if iv_part is not None else ("", "", "")
    iv_mode = mode if iv_part is not None else None
    iv_opts = opts if iv_part is not None and ":" in iv_part else None
    if chain_word is None or (chain_word == "plain" and iv_mode is None):
        chain_word, iv_mode = "cbc", "plain"  # the original format's default
    if chain_word != "ecb" and iv_mode is None:
        raise TargetError("IV mechanism required")
    if iv_mode == "essiv" and not iv_opts:
        raise TargetError("Digest algorithm missing for ESSIV mode")
    if cipher != "aes" or chain_word not in _CHAINS:
        raise TargetError(f"cipher {chain_word}({cipher}) is not supported by minidisk "
                          "(aes in xts, cbc and ecb is)")
    return _check_iv(CipherSpec(text, chain_word, iv_mode, iv_opts))


def _check_iv(spec: CipherSpec) -> CipherSpec:
    if spec.chain == "ecb":
        # No IV: 6.1 warns "Selected cipher does not support IVs" and drops the IV mode
        return replace(spec, iv_mode=None, iv_opts=None)
    if spec.iv_mode == "essiv":
        if spec.iv_opts not in _ESSIV_HASHES:
            raise TargetError(f"ESSIV hash {spec.iv_opts!r} is not supported by minidisk")
    elif spec.iv_mode == "eboiv" and spec.chain != "cbc":
        # 6.1 takes xts-eboiv too, encrypting the IV with XTS itself
        raise TargetError(f"IV mode eboiv with {spec.chain} is not supported by minidisk")
    elif spec.iv_mode in _KERNEL_ONLY_IVS:
        raise TargetError(f"IV mode {spec.iv_mode} is not supported by minidisk")
    elif spec.iv_mode not in _IV_MODES:
        raise TargetError("Invalid IV mode")
    return spec


def key_size(word: str) -> int:
    """get_key_size: half the hex digits, or a keyring reference's `:LEN:`."""
    if word.startswith(":"):
        match = re.match(r":(\d+):", word)
        if match is None or int(match[1]) >= 2**32:
            raise TargetError("Cannot parse key size")
        return int(match[1])
    return len(word) // 2


def decode_key(word: str, chain: str) -> bytes:
    """crypt_set_key: hex2bin of `len // 2` bytes, then the cipher's setkey; a keyring
    reference is refused by name, with the errno 6.1 fails it with when the key is not
    in its keyring (ENOKEY for logon and user keys; there is no keyring here)."""
    if word.startswith(":"):
        kind, colon, description = word.split(":", 2)[2].partition(":")
        found = kind in ("logon", "user") and colon and description
        raise TargetError(f"key {word!r} is a kernel keyring reference ({kind}): "
                          "minidisk takes the key as hex only",
                          errno.ENOKEY if found else errno.EINVAL)
    size = key_size(word)
    digits = word[:2 * size]
    if not _HEX.fullmatch(digits) or size not in _KEY_SIZES[chain]:
        raise TargetError("Error decoding and setting key")
    return bytes.fromhex(digits)


class Crypt(Target):
    name = "crypt"
    version = (1, 24, 0)  # 6.1's

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) < 5:
            raise TargetError("Not enough arguments")
        key_size(args[1])  # "Cannot parse key size" comes before the options, as in 6.1
        self.sector_size = SECTOR
        self.allow_discards = False
        self.iv_large_sectors = False
        self.flags: list[str] = []  # accepted, without effect here: no CPUs or workqueues
        if len(args) > 5:
            self._parse_options(ctx, args[5:])
        self.spec = parse_cipher(args[0])
        self._set_key(decode_key(args[1], self.spec.chain))
        self.key_valid = True
        self.suspended = False
        self.shift = self.sector_size.bit_length() - 1 - 9  # log2(sector_size / 512)
        if not args[2].isdigit() or int(args[2]) >= 2**64 \
                or int(args[2]) & ((1 << self.shift) - 1):
            raise TargetError("Invalid iv_offset sector")
        self.iv_offset = int(args[2])
        if not args[4].isdigit() or int(args[4]) >= 2**64:
            raise TargetError("Invalid device sector")
        self.start = int(args[4])
        self.ref: DeviceRef = ctx.device(args[3], self.start)
        self.child = self.ref.device
        self.base = self.start * SECTOR
        child = self.child.caps
        # No extents: a hole below reads as zero ciphertext, which is not zero plaintext.
        # Zeroing is writing encrypted zeroes (BlockDevice.zero), as 6.1 has no
        # write-zeroes for crypt and the block layer writes zero pages through it.
        self.caps = Caps(read_only=child.read_only, flush=True, fua=child.fua,
                         trim=self.allow_discards and child.trim, zero=True, cache=True,
                         multi_conn=child.multi_conn, rotational=child.rotational)
        minimum = max(self.sector_size, self.child.block_size.minimum)
        self.block_size = BlockSize(minimum, max(4096, minimum), MAX_REQUEST)

    def _parse_options(self, ctx: TargetContext, words: list[str]) -> None:
        """crypt_ctr_optional; dm_read_arg_group's one message for a bad count."""
        count = words[0]
        if not count.isdigit() or int(count) > MAX_FEATURE_ARGS or int(count) > len(words) - 1:
            raise TargetError("Invalid number of feature args")
        for word in words[1:1 + int(count)]:
            option = word.lower()
            if option == "allow_discards":
                self.allow_discards = True
            elif option in ("same_cpu_crypt", "submit_from_crypt_cpus", "no_read_workqueue",
                            "no_write_workqueue"):
                if option not in self.flags:
                    self.flags.append(option)
            elif option == "iv_large_sectors":
                self.iv_large_sectors = True
            elif re.match(r"integrity:\d+:", word):
                raise TargetError(f"{word}: authenticated crypt (integrity) is not "
                                  "supported by minidisk")
            elif (size := re.fullmatch(r"sector_size:(\d+)", word)) is not None:
                # sscanf's %hu keeps the low 16 bits of a larger number
                value = int(size[1]) & 0xFFFF
                if value < SECTOR or value > 4096 or value & (value - 1):
                    raise TargetError("Invalid feature value for sector_size")
                if ctx.length & (value // SECTOR - 1):
                    raise TargetError("Device size is not multiple of sector_size feature")
                self.sector_size = value
            else:
                raise TargetError("Invalid feature arguments")

    def _set_key(self, key: bytes) -> None:
        self.key = key
        self.chain: _Chain = _CHAIN_TYPES[self.spec.chain](key)
        # What encrypts the IVs: ESSIV's salt-keyed AES, or EBOIV's the volume key's (its
        # CBC of one block under a zero IV is ECB)
        self.iv_cipher: CipherContext | None = _ecb(key) if self.spec.iv_mode == "eboiv" \
            else None
        if self.spec.iv_mode == "essiv":
            assert self.spec.iv_opts is not None
            salt = hashlib.new(_ESSIV_HASHES[self.spec.iv_opts], key).digest()
            if len(salt) not in (16, 24, 32):  # the salt keys AES: the kernel's setkey fails
                raise TargetError("Error decoding and setting key")
            self.iv_cipher = _ecb(salt)

    # The table

    def status_table(self) -> CryptTable:
        options: list[str] = []
        if self.allow_discards:
            options.append("allow_discards")
        options += [f for f in ("same_cpu_crypt", "submit_from_crypt_cpus",
                                "no_read_workqueue", "no_write_workqueue") if f in self.flags]
        if self.sector_size != SECTOR:
            options.append(f"sector_size:{self.sector_size}")
        if self.iv_large_sectors:
            options.append("iv_large_sectors")
        return CryptTable(self.spec.text, self.key.hex(), self.iv_offset, self.ref.key,
                          self.start, tuple(options))

    def devices(self) -> list[DeviceRef]:
        return [self.ref]

    # Lifecycle and messages

    async def presuspend(self, noflush: bool) -> None:
        # The kernel's postsuspend; a message cannot come between the two, as messages and
        # suspends both hold the device's lock (registry.py).
        self.suspended = True

    async def resume(self) -> None:
        if not self.key_valid:
            raise OSError(errno.EAGAIN, "aborting resume - crypt key is not set.")
        self.suspended = False

    async def message(self, args: list[str]) -> str | None:
        if len(args) >= 2 and args[0].lower() == "key":
            if not self.suspended:
                raise OSError(errno.EINVAL, "not suspended during key manipulation.")
            verb = args[1].lower()
            if len(args) == 3 and verb == "set":
                try:
                    if key_size(args[2]) != len(self.key):  # the size may not change
                        raise TargetError("key size differs")
                    key = decode_key(args[2], self.spec.chain)
                except TargetError as e:
                    raise OSError(e.errno, str(e)) from None
                self._set_key(key)
                self.key_valid = True
                return None
            if len(args) == 2 and verb == "wipe":
                # As crypt_wipe_key: the ciphers get a random key, the key reads as zeroes
                # (Python cannot scrub the old bytes; nothing refers to them any more).
                self.key_valid = False
                self._set_key(os.urandom(len(self.key)))
                self.key = bytes(len(self.key))
                return None
        raise OSError(errno.EINVAL, "unrecognised message received.")

    # I/O

    def _ivs(self, sector: int, units: int) -> bytes:
        """The IVs of `units` units from target sector `sector`, as the kernel numbers them:
        512-byte sectors plus iv_offset, or units with iv_large_sectors."""
        first = sector + self.iv_offset
        step = self.sector_size // SECTOR
        if self.iv_large_sectors:
            first >>= self.shift
            step = 1
        numbers = range(first, first + step * units, step)
        mode = self.spec.iv_mode
        mask = (1 << 64) - 1  # plain64 wraps as the kernel's u64 does
        if mode == "null":
            return bytes(BLOCK * units)
        if mode == "plain":
            mask = 0xFFFFFFFF
        elif mode == "benbi":  # 16-byte blocks counted from 1: sector << 5, plus one
            numbers = range((first << 5) + 1, (first << 5) + 1 + (step << 5) * units,
                            step << 5)
        elif mode == "eboiv":  # the unit's byte offset, as the kernel multiplies it
            numbers = range(first * self.sector_size,
                            (first + step * units) * self.sector_size, step * self.sector_size)
        ivs = _iv_struct(units, mode in ("plain64be", "benbi")).pack(
            *(n & mask for n in numbers))
        if self.iv_cipher is not None:
            return self.iv_cipher.update(ivs)
        return ivs

    def _check(self, offset: int, length: int) -> None:
        if (offset | length) & (self.sector_size - 1):
            raise OSError(errno.EIO, f"crypt request {offset}+{length} is not aligned to "
                                     f"its {self.sector_size}-byte sectors")

    def _convert(self, data: memoryview, offset: int, encrypt: bool) -> bytes:
        unit = self.sector_size
        units = len(data) // unit
        ivs = self._ivs(offset // SECTOR, units)
        if encrypt:
            return self.chain.encrypt(data, ivs, unit)
        return self.chain.decrypt(data, ivs, unit)

    async def pread(self, buf: memoryview, offset: int) -> None:
        self._check(offset, len(buf))
        await self.child.pread(buf, offset + self.base)
        for pos in range(0, len(buf), CHUNK):
            piece = buf[pos:pos + CHUNK]
            piece[:] = self._convert(piece, offset + pos, encrypt=False)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self._check(offset, len(buf))
        # A new buffer: the caller's is never changed.
        out = b"".join(self._convert(buf[pos:pos + CHUNK], offset + pos, encrypt=True)
                       for pos in range(0, len(buf), CHUNK))
        await self.child.pwrite(memoryview(out), offset + self.base, fua)

    async def flush(self) -> None:
        if self.child.caps.flush:
            await self.child.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if not self.allow_discards:
            raise OSError(errno.EOPNOTSUPP, "crypt target without allow_discards")
        await self.child.trim(offset + self.base, length, fua)
