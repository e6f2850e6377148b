"""The server's fast check of plain READ/WRITE requests (connection.plain_io) against the
full one (checks.check_request): the fast one may only accept what the full one accepts,
for every command, flag, range, block size and read-only export."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidisk.device.api import MAX_REQUEST, BlockSize
from minidisk.device.memory import MemoryDevice
from minidisk.nbd import protocol as p
from minidisk.nbd.checks import MAX_PAYLOAD, check_request
from minidisk.nbd.connection import plain_io
from minidisk.nbd.negotiation import TransmissionTerms

SIZE = 1 << 20
BLOCK_SIZES = [BlockSize(), BlockSize(512, 4096, MAX_REQUEST), BlockSize(4096, 4096, 65536),
               BlockSize(1, 4096, 8192)]
# Around the edges that matter: 0, the end of the device, block multiples, the maximums.
EDGES = [0, 1, 511, 512, 4095, 4096, 8192, 65536, 65537, SIZE - 4096, SIZE - 1, SIZE,
         SIZE + 1, MAX_REQUEST, MAX_PAYLOAD, MAX_PAYLOAD + 512]
numbers = st.one_of(st.sampled_from(EDGES), st.integers(0, SIZE + 8192),
                    st.integers(0, 2**32 - 1))
flag_values = st.one_of(st.just(0), st.sampled_from([p.CMD_FLAG_FUA, p.CMD_FLAG_NO_HOLE,
                                                     p.CMD_FLAG_DF, p.CMD_FLAG_REQ_ONE,
                                                     p.CMD_FLAG_FAST_ZERO]),
                        st.integers(0, 0xFFFF))


def terms(read_only: bool) -> TransmissionTerms:
    tflags = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA
    return TransmissionTerms(structured=True, base_allocation=True, no_zeroes=True,
                             tflags=tflags | (p.TFLAG_READ_ONLY if read_only else 0))


@settings(max_examples=3000, deadline=None)
@given(cmd=st.integers(0, 12), flags=flag_values, offset=numbers, length=numbers,
       block_size=st.sampled_from(BLOCK_SIZES), read_only=st.booleans())
def test_the_fast_check_accepts_only_what_check_request_accepts(
        cmd: int, flags: int, offset: int, length: int, block_size: BlockSize,
        read_only: bool) -> None:
    device = MemoryDevice(SIZE, block_size)
    if plain_io(device, not read_only, cmd, flags, offset, length):
        assert check_request(terms(read_only), device, cmd, flags, offset, length) == (0, "")


@pytest.mark.parametrize("cmd", [p.CMD_READ, p.CMD_WRITE])
def test_plain_requests_take_the_fast_path(cmd: int) -> None:
    """Not a tautology: the common request does not fall through to the slow check."""
    device = MemoryDevice(SIZE)
    assert plain_io(device, True, cmd, 0, 4096, 4096)
    assert plain_io(device, True, cmd, 0, SIZE - 65536, 65536)
    assert not plain_io(device, False, p.CMD_WRITE, 0, 0, 4096)  # read-only
    assert not plain_io(device, True, cmd, p.CMD_FLAG_FUA, 0, 4096)  # flags: the full check
    assert not plain_io(device, True, cmd, 0, SIZE - 4096, 8192)  # past the end
