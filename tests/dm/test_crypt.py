"""The crypt target: published vectors at the sector level, the batched ciphers against
cryptography's own XTS and CBC, table text, refusals with 6.1's messages, and the key
messages (only while suspended)."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from tests.dm.dm_helpers import SECTOR, memory_namespace, read, registry_over, run, write

from minidisk.device.memory import MemoryDevice
from minidisk.dm import Registry
from minidisk.dm.table import TableError
from minidisk.dm.targets.crypt import Crypt

DEVICE = 1 << 20


def _registry() -> tuple[Registry, MemoryDevice]:
    ns = memory_namespace(a=DEVICE)
    device = ns.lookup("/dev/a")
    assert isinstance(device, MemoryDevice)
    return registry_over(ns), device


async def _sector0_ciphertext(cipher: str, key: str, iv_offset: int,
                              plaintext: bytes) -> bytes:
    """`plaintext` (padded to a sector) written at sector 0 of a crypt device; the bytes
    that reached the device below, cut to the plaintext's length."""
    reg, below = _registry()
    await reg.create("c", f"0 8 crypt {cipher} {key} {iv_offset} /dev/a 0")
    await write(reg.get("c"), 0, plaintext.ljust(SECTOR, b"\0"))
    raw = await read(below, 0, SECTOR)
    assert await read(reg.get("c"), 0, SECTOR) == plaintext.ljust(SECTOR, b"\0")
    await reg.remove("c")
    return raw[:len(plaintext)]


# IEEE 1619-2007 annex B, XTS-AES-128: (key1 key2, data unit sequence number, plaintext,
# ciphertext). A data unit of 32 bytes encrypts as the first 32 bytes of a sector whose
# tweak is that number (XTS blocks do not depend on the blocks after them), so each runs
# as sector 0 of a table whose iv_offset is the sequence number.
XTS_VECTORS = [
    ("00" * 32, 0, bytes(32),
     "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
    ("11" * 16 + "22" * 16, 0x3333333333, b"\x44" * 32,
     "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
    ("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0", 0x123456789a,
     b"\x44" * 32, "b01f86f8edc1863706fa8a4253e34f28af319de38334870f4dd1f94cbe9832f1"),
    # Vector 4: a whole 512-byte data unit, sector 0.
    ("2718281828459045235360287471352631415926535897932384626433832795", 0,
     bytes(range(256)) * 2,
     "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
     "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
     "328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
     "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265"
     "5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8"
     "a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
     "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c"
     "5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e"
     "94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
     "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3"
     "e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344"
     "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
     "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752"
     "afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e"
     "bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
     "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568"),
]


@pytest.mark.parametrize("key,sector,plaintext,ciphertext", XTS_VECTORS)
def test_ieee_1619_xts_vectors_at_the_sector_level(key: str, sector: int, plaintext: bytes,
                                                   ciphertext: str) -> None:
    assert run(_sector0_ciphertext("aes-xts-plain64", key, sector, plaintext)).hex() \
        == ciphertext


# Linux's own essiv(cbc(aes),sha256) vectors (crypto/testmgr.h, essiv_aes_cbc_tv_template):
# the IV there is the sector number as le64, so each is sector 0 with that iv_offset, and a
# CBC prefix encrypts as the start of the sector.
ESSIV_VECTORS = [
    ("06a9214036b8a15b512e03d534120006", "3dafba429d9eb430", b"Single block msg",
     "fa59e75f415665c336ca6b72109f8cd4"),
    ("c286696d887c9aa0611bbb3e2025a45a", "562e17996d093d28", bytes(range(32)),
     "c8599afe79e67b20067d550a5ec7b5a70b9c80d215a1b86dc6ab7b65d9fd88eb"),
    ("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", "0001020304050607",
     bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                   "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"),
     "966da97a42e601c717fca741d3380be55148f77e5e26a9fe45721cd9deabf34d"
     "3947c54f973a55638029644c33e8218a6aef6b6a8f43c0cbf0f36e7454449244"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", "0001020304050607",
     bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                   "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"),
     "2452f14874d0a793759b6346c01c1e174ddc5b3a27932a63f7f1c7b354565b50"
     "a331a58bd6fdb63c8bf6f245050cc8bb320b261ce98b02c0b26f37a75ba8a942"),
]


@pytest.mark.parametrize("key,iv,plaintext,ciphertext", ESSIV_VECTORS)
def test_cbc_essiv_known_values_at_the_sector_level(key: str, iv: str, plaintext: bytes,
                                                    ciphertext: str) -> None:
    sector = int.from_bytes(bytes.fromhex(iv), "little")
    assert run(_sector0_ciphertext("aes-cbc-essiv:sha256", key, sector, plaintext)).hex() \
        == ciphertext


def _reference(cipher: str, key: bytes, data: bytes, iv_sectors: list[int],
               unit: int) -> bytes:
    """One unit at a time with cryptography's own modes: what the batched code must equal."""
    out = b""
    for n, pos in zip(iv_sectors, range(0, len(data), unit), strict=True):
        if cipher.endswith("plain"):
            iv = (n & 0xFFFFFFFF).to_bytes(16, "little")
        elif cipher.endswith("benbi"):
            iv = bytes(8) + ((n << 5) + 1).to_bytes(8, "big")
        elif cipher.endswith("eboiv"):
            iv = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(
                (n * unit).to_bytes(16, "little"))
        else:
            iv = (n % 2**64).to_bytes(16, "little")
        if "essiv" in cipher:
            salt = hashlib.sha256(key).digest()
            iv = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(iv)
        mode: modes.XTS | modes.CBC = modes.XTS(iv) if "xts" in cipher else modes.CBC(iv)
        out += Cipher(algorithms.AES(key), mode).encryptor().update(data[pos:pos + unit])
    return out


CROSS = [
    ("aes-xts-plain64", 64, 0, ""), ("aes-xts-plain64", 32, 5, ""),
    ("aes-xts-plain", 64, 2**32 - 3, ""),  # the 32-bit IV wraps inside the request
    ("aes-cbc-plain64", 32, 7, ""), ("aes-cbc-plain", 16, 2**32 - 2, ""),
    ("aes-cbc-essiv:sha256", 32, 3, ""),
    ("aes-xts-plain64", 64, 16, "2 sector_size:4096 iv_large_sectors"),
    ("aes-xts-plain64", 64, 16, "1 sector_size:4096"),
    ("aes-cbc-essiv:sha256", 24, 8, "1 sector_size:1024"),
    ("capi:xts(aes)-plain64", 64, 0, ""), ("capi:cbc(aes)-essiv:sha256", 32, 0, ""),
    ("aes-cbc-benbi", 32, 5, ""), ("aes-cbc-eboiv", 16, 3, ""),
    ("aes-cbc-eboiv", 32, 16, "1 sector_size:4096"),
]


@pytest.mark.parametrize("cipher,key_bytes,iv_offset,options", CROSS)
def test_batched_ciphers_equal_one_unit_at_a_time(cipher: str, key_bytes: int,
                                                  iv_offset: int, options: str) -> None:
    """Requests of 1 to 2100 units (across the 1 MiB conversion chunk) at odd places: the
    device below holds what cryptography's XTS and CBC make of each unit, and reads back."""
    key = os.urandom(key_bytes)
    unit = 4096 if "4096" in options else 1024 if "1024" in options else SECTOR

    async def go() -> None:
        ns = memory_namespace(a=4 << 20)
        reg = registry_over(ns)
        below = ns.lookup("/dev/a")
        await reg.create("c", f"0 8192 crypt {cipher} {key.hex()} {iv_offset} /dev/a 0 "
                              f"{options}")
        dev = reg.get("c")
        for first, count in ((0, 1), (3, 7), (9, 2100 * SECTOR // unit)):
            offset = first * unit
            data = os.urandom(count * unit)
            await write(dev, offset, data)
            step = 1 if "iv_large_sectors" in options else unit // SECTOR
            start = (offset // SECTOR + iv_offset) // (unit // SECTOR if step == 1 else 1)
            sectors = [start + step * i for i in range(count)]
            assert await read(below, offset, len(data)) == _reference(
                cipher.replace("capi:", ""), key, data, sectors, unit)
            assert await read(dev, offset, len(data)) == data
        await reg.remove("c")

    run(go())


KEY64 = bytes(range(64)).hex()


def _table(reg: Registry, name: str) -> str:
    ((_, _, _, args),) = reg.table(name)
    return " ".join(args)


@pytest.mark.parametrize("given,printed", [
    (f"aes-xts-plain64 {KEY64} 0 /dev/a 0", f"aes-xts-plain64 {KEY64} 0 240:0 0"),
    (f"aes-xts-plain64 {KEY64.upper()}f 16 /dev/a 0",  # odd digit ignored, printed lower
     f"aes-xts-plain64 {KEY64} 16 240:0 0"),
    (f"aes-xts-plain64 {KEY64} 8 /dev/a 0 7 iv_large_sectors no_write_workqueue "
     "sector_size:4096 no_read_workqueue submit_from_crypt_cpus same_cpu_crypt "
     "ALLOW_DISCARDS",
     f"aes-xts-plain64 {KEY64} 8 240:0 0 7 allow_discards same_cpu_crypt "
     "submit_from_crypt_cpus no_read_workqueue no_write_workqueue sector_size:4096 "
     "iv_large_sectors"),
    (f"aes-xts-plain64 {KEY64} 0 /dev/a 0 2 allow_discards allow_discards extra",
     f"aes-xts-plain64 {KEY64} 0 240:0 0 1 allow_discards"),
    (f"aes-cbc-essiv:sha256 {KEY64[:64]} 0 /dev/a 0 1 sector_size:512",
     f"aes-cbc-essiv:sha256 {KEY64[:64]} 0 240:0 0"),
    (f"aes {KEY64[:32]} 0 /dev/a 0", f"aes {KEY64[:32]} 0 240:0 0"),
    (f"aes-cbc-essiv:md5 {KEY64[:32]} 0 /dev/a 0", f"aes-cbc-essiv:md5 {KEY64[:32]} 0 240:0 0"),
    (f"capi:cbc(aes)-essiv:sha256 {KEY64[:64]} 0 /dev/a 0",
     f"capi:cbc(aes)-essiv:sha256 {KEY64[:64]} 0 240:0 0"),
])
def test_table_as_61_prints_it(given: str, printed: str) -> None:
    reg, _ = _registry()

    async def go() -> None:
        await reg.create("c", f"0 2048 crypt {given}")
        assert _table(reg, "c") == printed
        assert reg.status("c") == [(0, 2048, "crypt", "")]
        await reg.create("again", f"0 2048 crypt {printed.replace('240:0', '/dev/a')}")
        assert _table(reg, "again") == printed

    run(go())


@pytest.mark.parametrize("args,reason", [
    (f"aes-xts-plain64 {KEY64} 0 /dev/a", "Not enough arguments"),
    ("aes-xts-plain64 :xx:logon:k 0 /dev/a 0", "Cannot parse key size"),
    (f"aes-xts-plain64 {KEY64} 0 /dev/a 0 9 a b c d e f g h i",
     "Invalid number of feature args"),
    (f"aes-xts-plain64 {KEY64} 0 /dev/a 0 2 allow_discards", "Invalid number of feature args"),
    (f"aes-xts-plain64 {KEY64} 0 /dev/a 0 1 bogus", "Invalid feature arguments"),
    (f"aes-xts-plain64 {KEY64} 0 /dev/a 0 1 sector_size:4096x", "Invalid feature arguments"),
    (f"aes-xts-plain64 {KEY64} 0 /dev/a 0 1 sector_size:1000",
     "Invalid feature value for sector_size"),
    (f"aes-xts-plain64 {KEY64} 3 /dev/a 0 1 sector_size:4096", "Invalid iv_offset sector"),
    (f"aes-xts-plain64 {KEY64} x /dev/a 0", "Invalid iv_offset sector"),
    (f"aes-xts-plain64 {KEY64} 0 /dev/a x", "Invalid device sector"),
    (f"aes-xts-plain64 {KEY64[:64]}zz 0 /dev/a 0", "Error decoding and setting key"),
    (f"aes-xts-plain64 {KEY64[:32]} 0 /dev/a 0", "Error decoding and setting key"),
    ("aes-xts-plain64 - 0 /dev/a 0", "Error decoding and setting key"),
    (f"aes-xts-foo {KEY64} 0 /dev/a 0", "Invalid IV mode"),
    (f"aes-xts {KEY64} 0 /dev/a 0", "IV mechanism required"),
    (f"aes-cbc-essiv {KEY64} 0 /dev/a 0", "Digest algorithm missing for ESSIV mode"),
    (f"aes-cbc-essiv:sha1 {KEY64[:64]} 0 /dev/a 0", "Error decoding and setting key"),
    (f"aes- {KEY64} 0 /dev/a 0", "IV mechanism required"),
    (f"aes(x)-cbc-plain {KEY64} 0 /dev/a 0", "Bad cipher specification"),
    (f"aes:3-cbc-plain {KEY64} 0 /dev/a 0", "Bad cipher key count specification"),
])
def test_bad_tables_refused_with_61s_messages(args: str, reason: str) -> None:
    refused = _refusal(args)
    assert refused.reason == f"crypt: {reason}"
    assert refused.errno == errno.EINVAL


def _refusal(args: str) -> TableError:
    """The error creating a crypt device with `args` fails with; nothing is left created."""
    reg, _ = _registry()

    async def go() -> TableError:
        with pytest.raises(TableError) as refused:
            await reg.create("c", f"0 2048 crypt {args}")
        assert reg.names() == []
        return refused.value

    return run(go())


@pytest.mark.parametrize("args,named", [
    ("aes-xts-plain64 :64:logon:my_prefix:my_key 0 /dev/a 0", ":64:logon:my_prefix:my_key"),
    ("aes-xts-plain64 :64:user:k 0 /dev/a 0", ":64:user:k"),
    (f"aes:2-cbc-plain {KEY64} 0 /dev/a 0", "key count 2"),
    (f"aes-cbc-lmk {KEY64} 0 /dev/a 0", "lmk"),
    (f"aes-xts-eboiv {KEY64} 0 /dev/a 0", "eboiv with xts"),
    (f"aes-cbc-essiv:shake_128 {KEY64[:64]} 0 /dev/a 0", "shake_128"),
    (f"serpent-xts-plain64 {KEY64} 0 /dev/a 0", "xts(serpent)"),
    (f"aes-xts-plain64 {KEY64} 0 /dev/a 0 1 integrity:28:aead", "integrity:28:aead"),
    (f"capi:xts(aes) {KEY64} 0 /dev/a 0", "capi:xts(aes)"),
])
def test_what_only_the_kernel_does_is_refused_by_name(args: str, named: str) -> None:
    refused = _refusal(args)
    assert named in refused.reason and "minidisk" in refused.reason
    # 6.1 fails a logon or user key it does not find with ENOKEY
    assert refused.errno == (errno.ENOKEY if ":logon:" in args or ":user:" in args
                             else errno.EINVAL)


def test_key_messages_only_while_suspended_and_resume_needs_a_key() -> None:
    reg, below = _registry()
    other = bytes(reversed(range(64))).hex()

    async def go() -> None:
        await reg.create("c", f"0 2048 crypt aes-xts-plain64 {KEY64} 0 /dev/a 0")
        dev = reg.get("c")
        await write(dev, 0, b"secret".ljust(4096, b"."))
        for message in (["key", "wipe"], ["key", "set", other]):
            with pytest.raises(OSError) as refused:
                await reg.message("c", 0, message)
            assert refused.value.errno == errno.EINVAL
            assert "not suspended" in str(refused.value)
        assert (await read(dev, 0, 512))[:6] == b"secret"  # the live key is untouched

        await reg.suspend("c")
        for bad in (["key", "set", KEY64[:64]],  # another size
                    ["key", "set", ":32:logon:k"], ["key", "set", ":64:logon:k"],
                    ["key", "wipe", "now"], ["key"], ["foo", "bar"]):
            with pytest.raises(OSError) as refused:
                await reg.message("c", 0, bad)
            # as 6.1: a keyring key of the right size is looked up (and not found)
            assert refused.value.errno == (errno.ENOKEY if bad[-1].startswith(":64:")
                                           else errno.EINVAL)
        await reg.message("c", 0, ["KEY", "WIPE"])
        assert _table(reg, "c").split()[1] == "00" * 64  # as 6.1 prints a wiped key
        with pytest.raises(OSError) as refused:
            await reg.resume("c")
        assert refused.value.errno == errno.EAGAIN
        assert reg.info("c").suspended

        await reg.message("c", 0, ["key", "set", other])
        await reg.resume("c")
        assert not reg.info("c").suspended
        assert _table(reg, "c").split()[1] == other
        garbage = await read(dev, 0, 4096)  # a wrong key reads garbage, not the plaintext
        assert b"secret" not in garbage and garbage != b"secret".ljust(4096, b".")

        await reg.suspend("c")
        await reg.message("c", 0, ["key", "set", KEY64])
        await reg.resume("c")
        assert (await read(dev, 0, 512))[:6] == b"secret"
        assert (await read(below, 0, 4096)).find(b"secret") == -1

    run(go())


def test_alignment_discards_and_zeroes() -> None:
    reg, below = _registry()

    async def go() -> None:
        await reg.create("c", f"0 2048 crypt aes-xts-plain64 {KEY64} 0 /dev/a 0 "
                              "1 sector_size:4096")
        dev = reg.get("c")
        assert dev.block_size.minimum == 4096
        assert not dev.caps.trim and not dev.caps.extents
        for offset, length in ((512, 4096), (0, 512)):  # not whole 4 KiB sectors: EIO
            with pytest.raises(OSError) as failed:
                await dev.pread(memoryview(bytearray(length)), offset)
            assert failed.value.errno == errno.EIO
        await write(dev, 0, os.urandom(8192))
        await dev.zero(0, 8192)  # encrypted zeroes: reads as zeroes, the device below not
        assert await read(dev, 0, 8192) == bytes(8192)
        assert await read(below, 0, 8192) != bytes(8192)
        await reg.create("d", f"0 8 crypt aes-xts-plain64 {KEY64} 0 /dev/a 8 1 allow_discards")
        assert reg.get("d").caps.trim

    run(go())


def test_version_is_61s() -> None:
    assert Crypt.version == (1, 24, 0)
