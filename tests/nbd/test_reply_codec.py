"""protocol.py's client-side reply checks, in memory (no sockets), as h11 tests its codec."""

from __future__ import annotations

import struct

import pytest

from minidisk.nbd import protocol as p
from minidisk.nbd import replies as r


def _option_header(option: int, reply: int, length: int) -> bytes:
    return struct.pack(">QIII", p.REPLY_MAGIC, option, reply, length)


def test_list_replies_are_bounded() -> None:
    replies = r.OptionReplies(p.OPT_LIST)
    name = struct.pack(">I", 4) + b"disk"
    for _ in range(r.MAX_OPTION_REPLIES):
        assert replies.data_length(_option_header(p.OPT_LIST, p.REP_SERVER, len(name))) == 8
        assert not replies.add(name)
    with pytest.raises(r.TooManyReplies):
        replies.data_length(_option_header(p.OPT_LIST, p.REP_SERVER, len(name)))


@pytest.mark.parametrize(("option", "reply", "length", "error"), [
    (p.OPT_LIST, p.REP_SERVER, 4 + 2 * p.MAX_STRING + 1, r.BadReplyLength),
    (p.OPT_GO, p.REP_INFO, 0xFFFFFFFF, r.BadReplyLength),
    (p.OPT_GO, p.REP_ERR_UNKNOWN, p.MAX_STRING + 1, r.BadReplyLength),
    (p.OPT_STRUCTURED_REPLY, p.REP_ACK, 1, r.BadReplyLength),
    (p.OPT_GO, p.REP_SERVER, 8, r.UnexpectedReply),
    (p.OPT_STRUCTURED_REPLY, p.REP_MINIDISK_RESULT, 2, r.UnexpectedReply),
    (p.OPT_MINIDISK_CONTROL, p.REP_MINIDISK_RESULT, r.MAX_CONTROL_RESULT + 1,
     r.BadReplyLength),
])
def test_option_reply_headers_are_checked_before_their_data(option: int, reply: int,
                                                            length: int,
                                                            error: type[Exception]) -> None:
    with pytest.raises(error):
        r.OptionReplies(option).data_length(_option_header(option, reply, length))


def test_option_reply_for_another_option() -> None:
    with pytest.raises(r.UnexpectedReply):
        r.OptionReplies(p.OPT_GO).data_length(_option_header(p.OPT_INFO, p.REP_ACK, 0))


def test_control_result_is_final() -> None:
    replies = r.OptionReplies(p.OPT_MINIDISK_CONTROL)
    assert replies.data_length(_option_header(p.OPT_MINIDISK_CONTROL, p.REP_MINIDISK_RESULT,
                                              2)) == 2
    assert replies.add(b"{}") and replies.final == (p.REP_MINIDISK_RESULT, b"{}")


def test_read_chunks_any_order_no_overlap() -> None:
    read = r.ExpectedReply(p.CMD_READ, 4096, 4096, structured=True)
    assert read.claim(4096 + 2048, 2048) == 2048
    assert read.claim(4096, 1024) == 0
    with pytest.raises(r.ChunkOutOfRange):
        read.claim(4096 + 1000, 100)  # inside the first claimed chunk
    with pytest.raises(r.ChunkOutOfRange):
        read.claim(4096 + 2000, 100)  # runs into the second
    with pytest.raises(r.IncompleteReply):
        read.finished()
    read.claim(4096 + 1024, 1024)
    read.finished()


def test_block_status_last_extent_is_cut_at_the_request() -> None:
    status = r.ExpectedReply(p.CMD_BLOCK_STATUS, 0, 1024, structured=True)
    payload = struct.pack(">IIIII", 9, 512, 0, 4096, 3)
    assert status.block_status(payload, 9) == [(0, 512, 0), (512, 512, 3)]
    status.finished()
    with pytest.raises(r.BadBlockStatus):  # one chunk per context
        status.block_status(payload, 9)


def test_error_chunk() -> None:
    payload = struct.pack(">IH", 5, 3) + b"bad"
    assert r.parse_error_chunk(p.REPLY_TYPE_ERROR, payload) == (5, "bad")
    with pytest.raises(r.BadErrorChunk):
        r.parse_error_chunk(p.REPLY_TYPE_ERROR_OFFSET, payload)  # its offset is missing
    with pytest.raises(r.BadErrorChunk):
        r.parse_error_chunk(p.REPLY_TYPE_ERROR, struct.pack(">IH", 0, 0))


def test_export_info_checks() -> None:
    export = struct.pack(">HQH", 0, 1 << 20, p.TFLAG_HAS_FLAGS)
    info = r.export_info([(p.REP_INFO, export),
                          (p.REP_INFO, struct.pack(">HIII", 3, 512, 4096, 1 << 25)),
                          (p.REP_INFO, struct.pack(">H", 99) + b"unknown, ignored")])
    assert (info.size, info.block_size) == (1 << 20, (512, 4096, 1 << 25))
    with pytest.raises(r.BadInfo):
        r.export_info([(p.REP_INFO, struct.pack(">HQH", 0, 1 << 20, 0))])  # no HAS_FLAGS
    with pytest.raises(r.BadInfo):
        r.export_info([(p.REP_INFO, export),
                       (p.REP_INFO, struct.pack(">HIII", 3, 512, 256, 1 << 25))])
